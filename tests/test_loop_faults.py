"""Kill the runner (a real subprocess, SIGKILL) at each dangerous point, then `run --resume`:
every finished experiment appears exactly once and the branch tip is the best kept commit."""
from __future__ import annotations

import json
import os
import signal
import time

import git
import pytest

from autoresearch import gitops
from loop_fixtures.helpers import cli_env, fake_val_of, ledger_records, make_repo, run_cli, tsv_rows

N = 4  # experiments after the baseline
RUN = ("run", "--agent", "hparam", "--backend", "mlx", "--tag", "f", "--max-experiments", str(N))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted: (status, val_bpb, description) per row."""
    d = tmp_path_factory.mktemp("ref") / "p"
    make_repo(d)
    r = run_cli(d, *RUN)
    assert r.returncode == 0, r.stderr
    return [(row[3], row[1], row[4]) for row in tsv_rows(d)]


def check_consistent(d):
    """No row lost or doubled, results.tsv == ledger, tip == best keep, tree clean."""
    repo = git.Repo(d)
    results = ledger_records(d, "result")
    exps = [r["exp"] for r in results]
    assert exps == sorted(set(exps)), "an experiment was logged twice"
    rows = tsv_rows(d)
    assert len(rows) == len(results)
    for row, rec in zip(rows, results):
        assert row[3] == rec["status"] and row[4] == " ".join(rec["description"].split())
    starts = {s["exp"] for s in ledger_records(d, "start")}
    assert starts <= set(exps), "an experiment that started has no result"
    kept = [r for r in results if r["status"] == "keep"]
    best = min(kept, key=lambda r: r["val_bpb"])
    assert repo.head.commit.hexsha == best["commit"]
    assert repo.active_branch.name == "autoresearch/f"
    assert fake_val_of((d / "train_mlx.py").read_text()) == pytest.approx(best["val_bpb"])
    assert not gitops.changed_tracked_files(repo)
    for r in results:   # every scored row is what its commit's file scores
        if r["val_bpb"] is not None:
            assert r["val_bpb"] == pytest.approx(fake_val_of(repo.git.show(f"{r['commit']}:train_mlx.py")))
    return rows


def kill_then_resume(d, point, **env):
    make_repo(d)
    r = run_cli(d, *RUN, env=cli_env(AUTORESEARCH_CRASH_AT=point, **env))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr)
    before = tsv_rows(d) if (d / "results.tsv").exists() else []
    r = run_cli(d, "run", "--resume", "--max-experiments", str(N), env=cli_env(**env))
    assert r.returncode == 0, r.stdout + r.stderr
    return before, r.stdout


def test_kill_after_log_and_before_reset_lose_nothing(tmp_path, reference):
    # The result was written before the kill: the resumed run must equal an uninterrupted one.
    for point in ("after_log@2", "before_reset"):
        d = tmp_path / point.replace("@", "_")
        before, out = kill_then_resume(d, point)
        rows = check_consistent(d)
        assert [(r[3], r[1], r[4]) for r in rows] == reference, point
        assert len(before) >= 2


def test_kill_after_commit_logs_the_commit_as_crash(tmp_path, reference):
    d = tmp_path / "p"
    before, out = kill_then_resume(d, "after_commit@2")
    assert "never run" in out
    rows = check_consistent(d)
    assert [r[3] for r in before] == [s for s, _, _ in reference[:2]]
    assert rows[2][3] == "crash" and "interrupted before it ran" in rows[2][4]
    assert rows[2][4].startswith(reference[2][2])     # the commit's own description
    assert len(rows) == N + 1


def test_kill_during_run_kills_the_orphan_trainer_and_logs_a_crash(tmp_path, reference):
    d = tmp_path / "p"
    before, out = kill_then_resume(d, "during_run@1", FAKE_TRAIN_SECONDS="0.5")
    rows = check_consistent(d)
    assert rows[1][3] == "crash" and rows[1][4] == reference[1][2] + " (interrupted)"
    assert len(rows) == N + 1
    pgid = [s["pgid"] for s in ledger_records(d, "spawn") if s["exp"] == 1][0]
    try:
        os.killpg(pgid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_kill_during_baseline_reruns_the_baseline(tmp_path):
    d = tmp_path / "p"
    before, out = kill_then_resume(d, "during_run@0")
    rows = check_consistent(d)
    assert rows[0][3] == "crash" and rows[1][3] == "keep" and rows[1][4] == "baseline"
    assert len(rows) == N + 2       # the interrupted baseline is a row, not an experiment


def test_resume_removes_stale_lock_and_reattaches_detached_head(tmp_path, reference):
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, *RUN, env=cli_env(AUTORESEARCH_CRASH_AT="before_reset"))
    assert r.returncode == -signal.SIGKILL
    repo = git.Repo(d)
    repo.git.checkout("-q", "--detach", "HEAD~1")
    (d / ".git" / "index.lock").write_text("")
    # A torn last ledger line, as a power cut mid-write would leave.
    with open(d / "ledger.jsonl", "a") as f:
        f.write('{"event": "result", "exp": 9')
    r = run_cli(d, "run", "--resume", "--max-experiments", str(N))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stale .git/index.lock" in r.stdout and "Re-attached" in r.stdout and "torn" in r.stdout
    rows = check_consistent(d)
    assert [(r[3], r[1], r[4]) for r in rows] == reference


def test_status_shows_an_interrupted_experiment(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, *RUN, env=cli_env(AUTORESEARCH_CRASH_AT="during_run@1", FAKE_TRAIN_SECONDS="0.5"))
    assert r.returncode == -signal.SIGKILL
    time.sleep(0.6)   # let the orphaned trainer finish on its own
    s = run_cli(d, "status")
    assert s.returncode == 0 and "in flight: experiment 1" in s.stdout and "--resume" in s.stdout


def test_sigterm_stops_cleanly_kills_the_trainer_and_resumes(tmp_path):
    import subprocess
    import sys
    d = tmp_path / "p"
    make_repo(d)
    proc = subprocess.Popen([sys.executable, "-m", "autoresearch.cli", *RUN], cwd=d,
                            env=cli_env(FAKE_TRAIN_SECONDS="5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (d / "ledger.jsonl").exists() or \
            not ledger_records(d, "spawn"):
        time.sleep(0.05)
    pgid = ledger_records(d, "spawn")[0]["pgid"]
    second = run_cli(d, "run", "--resume", "--max-experiments", str(N))   # while the first one runs
    assert second.returncode == 2 and "another autoresearch runner" in second.stderr
    assert json.loads((d / ".git" / "autoresearch.lock").read_text())["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "--resume" in err
    assert not (d / ".git" / "autoresearch.lock").exists()
    time.sleep(0.5)                          # let init reap the trainer's own children
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)                  # the trainer went down with the runner
    r = run_cli(d, "run", "--resume", "--max-experiments", str(N))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = check_consistent(d)
    assert rows[0][3] == "crash" and rows[0][4] == "baseline (interrupted)" and rows[1][4] == "baseline"


def test_resume_refuses_to_discard_a_commit_the_user_made(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    assert run_cli(d, *RUN[:-1], "1").returncode == 0
    repo = git.Repo(d)
    (d / "notes.txt").write_text("my notes")
    repo.git.add("notes.txt")
    repo.git.commit("-qm", "my notes")
    r = run_cli(d, "run", "--resume", "--max-experiments", "2")
    assert r.returncode == 2 and "did not make" in r.stderr and "my notes" in r.stderr
    assert (d / "notes.txt").exists() and repo.head.commit.message.strip() == "my notes"
