"""Bad input to `autoresearch run`, tried as a new user would: each gets one clear line before
anything runs (no traceback, no branch, nothing moved), --resume refuses a changed setup, and
the ledger survives a full disk. Real git repositories, real CLI subprocesses."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import git
import pytest

from autoresearch import ledger as ledger_module
from autoresearch.ledger import Ledger, LedgerWriteError
from autoresearch.policy import Decisions
from autoresearch.runner import RunConfig, Runner, run
from autoresearch.trainer import RunOutcome, SetupError, Trainer
from loop_fixtures.helpers import (PROJECT, ScriptedAgent, cli_env, commit_all, ledger_records, make_repo,
                                   real_harness_repo, run_cli, tsv_rows)

NEWTON = PROJECT / "examples" / "newton_sqrt"
GENERAL = ("--metric-cmd", "python bench.py", "--metric-regex", "time_ms: ([0-9.]+)", "--direction", "min")


def one_line_error(r, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def nothing_started(d: Path):
    repo = git.Repo(d)
    assert not [b for b in repo.branches if b.name.startswith("autoresearch/")]
    assert not (d / "ledger.jsonl").exists()


def newton_repo(d: Path) -> Path:
    shutil.copytree(NEWTON, d)
    commit_all(d, "newton")
    return d


def test_scope_outside_the_repository_is_refused_and_the_outside_file_untouched(tmp_path):
    d = newton_repo(tmp_path / "t")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.py"
    victim.write_text("DAMPING = 0.2\n")
    (d / "link.py").symlink_to(victim)
    git.Repo(d).git.add("link.py")
    git.Repo(d).git.commit("-qm", "a link")
    for scope in ("../outside/victim.py", str(victim), "link.py"):
        r = run_cli(d, "run", "--agent", "hparam", "--max-experiments", "1", *GENERAL, "--scope", scope)
        one_line_error(r, "outside the repository")
        nothing_started(d)
    assert victim.read_text() == "DAMPING = 0.2\n"


def test_scope_must_be_a_tracked_unprotected_file(tmp_path):
    d = newton_repo(tmp_path / "t")
    (d / "autoresearch").mkdir()
    (d / "autoresearch" / "decide.py").write_text("x = 1\n")
    (d / "prepare.py").write_text("x = 1\n")
    (d / "pkg").mkdir()
    (d / "pkg" / "a.py").write_text("x = 1\n")
    repo = git.Repo(d)
    repo.git.add("-A")
    repo.git.commit("-qm", "more files")
    (d / "notes.py").write_text("x = 1\n")
    for scope, words in (("prepare.py", "part of the harness"), ("autoresearch/decide.py", "part of the harness"),
                         ("pkg", "is a folder"), ("notes.py", "not tracked"), ("nope.py", "no such file"),
                         (str(d / "solver.py"), "name the file itself")):
        r = run_cli(d, "run", "--agent", "hparam", "--max-experiments", "1", *GENERAL, "--scope", scope)
        one_line_error(r, words)
        nothing_started(d)


@pytest.mark.parametrize("args, env, words", [
    (("--tag", "a b"), {}, ("--tag 'a b'", "valid branch name")),
    (("--confidence", "1.5"), {}, ("--confidence 1.5", "[0.5, 1)")),
    (("--max-experiments", "-1"), {}, ("--max-experiments -1", "at least 0")),
    (("--reruns", "-2"), {}, ("--reruns -2",)),
    (("--max-spend", "0"), {}, ("--max-spend",)),
    ((), {"AUTORESEARCH_SEED": "abc"}, ("AUTORESEARCH_SEED='abc'", "whole number")),
    ((), {"AUTORESEARCH_TIMEOUT": "abc"}, ("AUTORESEARCH_TIMEOUT='abc'", "seconds")),
])
def test_bad_flags_and_settings_fail_in_one_line_before_anything_runs(tmp_path, args, env, words):
    d = tmp_path / "p"
    make_repo(d)
    (d / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\nabc1234\t1.0\t0.0\tkeep\tmine\n")
    r = run_cli(d, "run", "--agent", "hparam", "--max-experiments", "1", *args, env=cli_env(**env))
    one_line_error(r, *words)
    nothing_started(d)
    assert "mine" in (d / "results.tsv").read_text() and not list(d.glob("results.before-*"))


def test_a_git_failure_is_one_line_not_a_traceback(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    # a file where git wants the folder of autoresearch/* branches: `checkout -b` fails
    (d / ".git" / "refs" / "heads" / "autoresearch").write_text("not a folder\n")
    r = run_cli(d, "run", "--agent", "hparam", "--max-experiments", "1", "--decide", "greedy", "--tag", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "failed" in r.stderr and "git" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_resume_refuses_another_metric_command_or_direction(tmp_path):
    d = newton_repo(tmp_path / "t")
    base = ("run", "--agent", "hparam", "--tag", "g", "--decide", "greedy", "--scope", "solver.py")
    r = run_cli(d, *base, "--max-experiments", "0", *GENERAL)
    assert r.returncode == 0, r.stdout + r.stderr
    before = (d / "ledger.jsonl").read_text()
    r = run_cli(d, "run", "--resume", "--tag", "g", "--max-experiments", "1", "--metric-cmd", "python -c 'print(\"time_ms: 0.001\")'",
                "--metric-regex", "time_ms: ([0-9.]+)", "--scope", "solver.py")
    one_line_error(r, "--resume refused", "--metric-cmd", "python bench.py", "--tag g-2")
    r = run_cli(d, "run", "--resume", "--tag", "g", "--max-experiments", "1", *GENERAL[:4], "--direction", "max",
                "--scope", "solver.py")
    one_line_error(r, "--resume refused", "--direction")
    assert (d / "ledger.jsonl").read_text().startswith(before)
    assert [x["status"] for x in ledger_records(d, "result")] == ["keep"]


def test_resume_refuses_another_profile(tmp_path, builtin_cache):
    d = real_harness_repo(tmp_path)
    env = cli_env(**builtin_cache)
    r = run_cli(d, "run", "--agent", "hparam", "--tag", "s", "--decide", "greedy", "--max-experiments", "0", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli(d, "run", "--resume", "--max-experiments", "1", env={**env, "AUTORESEARCH_PROFILE": "quick"})
    one_line_error(r, "--resume refused", "profile", "'smoke' then, 'quick' now", "--tag s-2")
    assert [x["status"] for x in ledger_records(d, "result")] == ["keep"]


def test_general_mode_inside_the_project_checkout_scores_normally(tmp_path, builtin_cache):
    """The real prepare.py (which speaks the scorer protocol) is in the repository, but a
    --metric-cmd run is not a val_bpb run: its baseline is kept, not `invalid`."""
    d = real_harness_repo(tmp_path)
    for f in ("solver.py", "bench.py", "test_solver.py"):
        shutil.copy(NEWTON / f, d / f)
    repo = git.Repo(d)
    repo.git.add("-A")
    repo.git.commit("-qm", "newton inside the project")
    r = run_cli(d, "run", "--agent", "hparam", "--tag", "n", "--decide", "greedy", "--max-experiments", "1",
                *GENERAL, "--scope", "solver.py", env=cli_env(**builtin_cache))
    assert r.returncode == 0, r.stdout + r.stderr
    statuses = [x["status"] for x in ledger_records(d, "result")]
    assert statuses[0] == "keep" and "invalid" not in statuses, r.stdout


def test_a_truncated_training_shard_is_named_at_start_up(tmp_path, builtin_cache):
    cache = tmp_path / "cache"
    shutil.copytree(builtin_cache["AUTORESEARCH_CACHE"], cache)
    shard = sorted(p for p in (cache / "builtin" / "data").glob("*.parquet") if p.name != "val.parquet")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    d = real_harness_repo(tmp_path)
    r = run_cli(d, "run", "--agent", "hparam", "--max-experiments", "1",
                env=cli_env(**{**builtin_cache, "AUTORESEARCH_CACHE": str(cache)}))
    one_line_error(r, shard.name, "corrupt or incomplete", "prepare.py")
    nothing_started(d)


@pytest.mark.parametrize("cmd, words", [
    ("python -c 'print(\"elapsed 12 ms\")'", ("did not match", "elapsed 12 ms")),
    ("python -c 'print(\"time_ms: nan\")'", ("'nan'", "not a finite number")),
])
def test_an_unreadable_metric_is_named_not_blamed_on_the_scope_file(tmp_path, cmd, words):
    d = newton_repo(tmp_path / "t")
    r = run_cli(d, "run", "--agent", "hparam", "--tag", "m", "--decide", "greedy", "--max-experiments", "1",
                "--metric-cmd", cmd, "--metric-regex", "time_ms: ([0-9a-z.]+)", "--scope", "solver.py")
    assert r.returncode == 3, r.stdout + r.stderr
    stopped = [line for line in r.stdout.splitlines() if line.startswith("Stopped:")][0]
    for w in words:
        assert w in stopped, stopped
    assert "fix solver.py" not in stopped


def test_a_stale_lock_of_an_unrelated_autoresearch_process_is_taken_over(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "autoresearch"])
    try:
        lock = d / ".git" / "autoresearch.lock"
        lock.write_text(json.dumps({"pid": other.pid, "start": "a start long ago"}))
        r = run_cli(d, "run", "--agent", "hparam", "--max-experiments", "0", "--decide", "greedy")
        assert r.returncode == 0, r.stdout + r.stderr
        assert other.poll() is None                      # not ours to kill, and we did not ask to
        # a live runner's lock (the right start stamp) still keeps a second runner out
        from autoresearch.runner import process_start
        lock.write_text(json.dumps({"pid": other.pid, "start": process_start(other.pid)}))
        r = run_cli(d, "run", "--resume", "--max-experiments", "0")
        one_line_error(r, "another autoresearch runner", str(other.pid))
    finally:
        other.kill()
        other.wait()


def test_judging_without_a_kept_baseline_is_an_error(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    runner = Runner(d, RunConfig(tag="t", backend="mlx"), ScriptedAgent([]), Trainer.for_backend("mlx"),
                    out=lambda s: None)
    decisions = Decisions("greedy")
    decisions.runner = runner
    outcome = RunOutcome(0, False, 1.0, {"val_bpb": 1.0, "profile": "smoke", "dataset": "fake",
                                         "eval_tokens": 16384}, "")
    with pytest.raises(SetupError, match="no kept baseline.*books are damaged"):
        decisions.judge(1, outcome)


# -- the ledger on a full disk ---------------------------------------------------------------
def full_disk_after(monkeypatch, good_writes: int):
    """os.write as on a file system that fills up: `good_writes` writes succeed, then each
    write stores only part of its data, then ENOSPC."""
    real = os.write
    calls = {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] <= good_writes:
            return real(fd, data)
        if calls["n"] == good_writes + 1:
            return real(fd, bytes(data)[: max(1, len(data) // 2)])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ledger_module.os, "write", write)


def test_append_line_never_leaves_half_a_record(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"a": 1}\n')
    full_disk_after(monkeypatch, 0)
    with pytest.raises(LedgerWriteError, match="free disk space"):
        ledger_module.append_line(path, '{"b": 2}\n')
    assert path.read_text() == '{"a": 1}\n'


def test_a_full_disk_stops_the_run_and_resume_loses_nothing(tmp_path, monkeypatch):
    d = tmp_path / "p"
    make_repo(d)
    edits = [(f"MATRIX_LR {v}", lambda t, v=v: t.replace("MATRIX_LR = 0.04", f"MATRIX_LR = {v}")) for v in (0.06, 0.09)]
    config = RunConfig(tag="t", backend="mlx", max_experiments=2, max_fix_attempts=0)
    runner = Runner(d, config, ScriptedAgent(list(edits)), Trainer.for_backend("mlx"), out=lambda s: None,
                    decisions=Decisions("greedy"))
    full_disk_after(monkeypatch, 6)       # session, start, spawn, result, tsv header, tsv row: then full
    with pytest.raises(LedgerWriteError):
        run(runner, resume=False)
    monkeypatch.undo()
    kept = Ledger(d, "t").results()
    assert [r["description"] for r in kept] == ["baseline"]
    assert all(line.endswith("}") for line in (d / "ledger.jsonl").read_text().splitlines())
    r = run_cli(d, "run", "--resume", "--tag", "t", "--agent", "hparam", "--max-experiments", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    results = ledger_records(d, "result")
    assert results[0]["description"] == "baseline" and len(results) == 3
    assert [row[3] for row in tsv_rows(d)] == [x["status"] for x in results]


def test_repair_sets_a_corrupt_middle_line_aside(tmp_path):
    led = Ledger(tmp_path, "t")
    led.append("session", resumed=False)
    with open(led.path, "a") as f:
        f.write('{"event": "result", "tag": "t", "ex\n')          # glued half record
    led.append("result", exp=0, status="keep", val_bpb=1.0, description="baseline")
    with open(led.path, "a") as f:
        f.write('{"torn')
    notes = led.repair()
    assert any("corrupt" in n for n in notes) and any("torn" in n for n in notes)
    assert [r["event"] for r in led.all_records()] == ["session", "result"]
    aside = (tmp_path / "ledger.corrupt.jsonl").read_text()
    assert '"ex' in aside and '{"torn' in aside
    assert led.repair() == []
