"""The research loop end to end: real git repositories in temp dirs, the fake trainer run
as a real subprocess, the runner in-process (fast) and through the CLI."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import git
import pytest

from autoresearch import gitops
from autoresearch.agents import Agent, AgentFailed, Proposal
from autoresearch.agents.hparam import HparamAgent
from autoresearch.ledger import Ledger
from autoresearch.runner import RunConfig, Runner, RunStopped, decide_greedy, run
from autoresearch.trainer import Confinement, SetupError, Trainer, detect_backend, parse_summary, timeout_for
from loop_fixtures.helpers import HERE as HERE_FIXTURES, cli_env, fake_val_of, ledger_records, make_repo, run_cli, tsv_rows


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("AUTORESEARCH_", "FAKE_", "ANTHROPIC_")):
            monkeypatch.delenv(k)


class ScriptedAgent(Agent):
    """Applies a fixed list of edits (functions of the file text), one per experiment."""
    name = "scripted"

    def __init__(self, edits, fixes=()):
        self.edits = list(edits)
        self.fixes = list(fixes)
        self.fix_logs = []

    def propose(self, ctx):
        if not self.edits:
            raise AgentFailed("script exhausted")
        desc, edit = self.edits.pop(0)
        edit(ctx)
        return Proposal(description=desc, cost_usd=0.01)

    def fix(self, ctx):
        self.fix_logs.append(ctx.crash_log)
        if not self.fixes:
            return None
        desc, edit = self.fixes.pop(0)
        edit(ctx)
        return Proposal(description=desc, cost_usd=0.002)


def set_const(name, value):
    def edit(ctx):
        p = ctx.training_path
        p.write_text(re.sub(rf"^{name} = .*$", f"{name} = {value}", p.read_text(), count=1, flags=re.M))
    return edit


def make_runner(repo_dir, agent, max_experiments=None, **kw):
    config = RunConfig(tag="t", backend="mlx", max_experiments=max_experiments, **kw)
    return Runner(repo_dir, config, agent, Trainer.for_backend("mlx"), out=lambda s: None,
                  sleep=lambda s: None)


def test_scripted_loop_keeps_and_discards_correctly(tmp_path):
    repo = make_repo(tmp_path / "p")
    agent = ScriptedAgent([("lr up", set_const("MATRIX_LR", 0.06)),        # better: keep
                           ("lr way up", set_const("MATRIX_LR", 0.5)),     # worse: discard
                           ("embedding lr", set_const("EMBEDDING_LR", 0.5)),  # worse: discard
                           ("warmdown", set_const("WARMDOWN_RATIO", 0.6))])   # better: keep
    runner = make_runner(tmp_path / "p", agent, max_experiments=4)
    assert run(runner, resume=False) == 0
    rows = tsv_rows(tmp_path / "p")
    assert [r[3] for r in rows] == ["keep", "keep", "discard", "discard", "keep"]
    assert [r[4] for r in rows] == ["baseline", "lr up", "lr way up", "embedding lr", "warmdown"]
    # Each row's val_bpb is what that commit's training file scores.
    for commit, val, mem, status, _ in rows:
        assert float(val) == pytest.approx(fake_val_of(repo.git.show(f"{commit}:train_mlx.py")), abs=1e-6)
        assert mem == "4.0"
    # The branch holds baseline + the two keeps; the tip is the best commit, tree clean.
    assert repo.active_branch.name == "autoresearch/t"
    log = repo.git.log("--format=%s", "master..HEAD").splitlines()
    assert log == ["warmdown", "lr up"]
    assert repo.head.commit.hexsha.startswith(rows[-1][0])
    assert not gitops.changed_tracked_files(repo)
    assert "results.tsv" not in repo.git.status("--porcelain")
    # Ledger: full records, costs summed.
    results = ledger_records(tmp_path / "p", "result")
    assert [r["exp"] for r in results] == [0, 1, 2, 3, 4]
    assert results[1]["profile"] == "smoke" and results[1]["dataset"] == "fake"
    assert results[1]["eval_tokens"] == 64 * 256 and results[1]["backend"] == "mlx"
    assert Ledger(tmp_path / "p", "t").spent_usd() == pytest.approx(0.04)
    # New files' first runs start from the compiled kernels of the user's start file.
    from autoresearch.trainer import kernel_key
    assert runner.trainer.kernel_seed == kernel_key((HERE_FIXTURES / "fake_train.py").read_bytes())


def test_set_up_refuses_dirty_tree_existing_branch_and_missing_data(tmp_path, monkeypatch):
    d = tmp_path / "p"
    repo = make_repo(d)
    (d / "prepare.py").write_text((d / "prepare.py").read_text() + "\n# local edit\n")
    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "x", "--max-experiments", "1")
    assert r.returncode == 2 and "uncommitted changes" in r.stderr and "prepare.py" in r.stderr
    repo.git.checkout("--", "prepare.py")

    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "x", "--max-experiments", "1",
                env=cli_env(FAKE_DATA_MISSING=1))
    assert r.returncode == 2 and "uv run prepare.py" in r.stderr and "Traceback" not in r.stderr
    assert not gitops.branch_exists(repo, "autoresearch/x")

    r = run_cli(d, "run", "--agent", "hparam", "--backend", "cuda", "--tag", "x")
    assert r.returncode == 2 and "train.py" in r.stderr and "--backend" in r.stderr

    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "x", "--max-experiments", "1")
    assert r.returncode == 0, r.stderr
    repo.git.checkout("-q", "master")
    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "x", "--max-experiments", "1")
    assert r.returncode == 2 and "already exists" in r.stderr and "--resume" in r.stderr

    bin_dir = tmp_path / "bin-without-claude"      # git, but no `claude`
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    r = run_cli(d, "run", "--agent", "claude-code", "--backend", "mlx", "--tag", "y",
                env=cli_env(PATH=str(bin_dir)))
    assert r.returncode == 2 and "Claude Code" in r.stderr and "not installed" in r.stderr


def test_cli_hparam_run_status_report(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    (d / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\nabc\t1.0\t1.0\tkeep\thand run\n")
    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "cli", "--max-experiments", "3")
    assert r.returncode == 0, r.stderr
    assert "Moved the existing results.tsv" in r.stdout and (d / "results.before-cli.tsv").exists()
    rows = tsv_rows(d)
    assert len(rows) == 4 and rows[0][4] == "baseline"
    assert rows[1][4] == "MATRIX_LR 0.04 -> 0.08" and rows[1][3] == "keep"
    exclude = (d / ".git" / "info" / "exclude").read_text()
    assert "/results.tsv" in exclude and "/ledger.jsonl" in exclude and "/run.log" in exclude
    assert git.Repo(d).git.status("--porcelain") == ""

    s = run_cli(d, "status")
    assert s.returncode == 0 and "autoresearch/cli" in s.stdout and "experiments: 4" in s.stdout
    assert "best:" in s.stdout and "in flight" not in s.stdout
    rep = run_cli(d, "report")
    assert rep.returncode == 0 and "baseline" in rep.stdout and "lower" in rep.stdout
    png = d / "progress.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    h = run_cli(d, "run", "--help")
    for flag in ("--backend", "--agent", "--tag", "--model", "--max-experiments", "--max-spend", "--resume",
                 "hparam", "claude-code", "anthropic"):
        assert flag in h.stdout


def test_violations_are_logged_invalid_and_never_run(tmp_path):
    d = tmp_path / "p"
    repo = make_repo(d)

    def touch_prepare(ctx):
        set_const("MATRIX_LR", 0.06)(ctx)
        p = ctx.repo_root / "prepare.py"
        p.write_text(p.read_text() + "\nDATASET = 'cheat'\n")

    def touch_program(ctx):
        set_const("MATRIX_LR", 0.06)(ctx)
        (ctx.repo_root / "program.md").write_text("new rules")

    def agent_commits(ctx):
        set_const("MATRIX_LR", 0.06)(ctx)
        r = git.Repo(ctx.repo_root)
        r.git.commit("-q", "-am", "sneaky")

    def untracked_protected(ctx):
        set_const("MATRIX_LR", 0.06)(ctx)
        (ctx.repo_root / "autoresearch").mkdir(exist_ok=True)
        (ctx.repo_root / "autoresearch" / "runner.py").write_text("# replaced\n")

    def fine_with_ignored_cache(ctx):
        set_const("MATRIX_LR", 0.06)(ctx)
        # Ignored build output inside a protected folder (bytecode, compiled kernels) is no violation.
        cache = ctx.repo_root / "autoresearch" / "__pycache__"
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "gitops.cpython-311.pyc").write_bytes(b"\0" * 16)

    agent = ScriptedAgent([("p", touch_prepare), ("m", touch_program), ("c", agent_commits),
                           ("u", untracked_protected), ("fine", fine_with_ignored_cache)])
    runner = make_runner(d, agent, max_experiments=5)
    assert run(runner, resume=False) == 0
    rows = tsv_rows(d)
    assert [r[3] for r in rows] == ["keep", "invalid", "invalid", "invalid", "invalid", "keep"]
    assert "prepare.py" in rows[1][4] and "program.md" in rows[2][4]
    assert "HEAD moved" in rows[3][4] and "autoresearch" in rows[4][4]
    # Invalid edits never reached the trainer: one start record per run, none for invalid ones.
    starts = ledger_records(d, "start")
    assert [s["description"] for s in starts] == ["baseline", "fine"]
    assert "cheat" not in (d / "prepare.py").read_text()
    assert repo.git.log("--format=%s", "master..HEAD").splitlines() == ["fine"]


def test_crash_gets_fix_attempts_then_crash_row_and_reset(tmp_path):
    d = tmp_path / "p"
    repo = make_repo(d)
    breaks = ("deeper", set_const("DEPTH", 9))            # the fake trainer crashes above 6
    agent = ScriptedAgent([breaks, ("deeper again", set_const("DEPTH", 8)), ("lr", set_const("MATRIX_LR", 0.06))],
                          fixes=[("still too deep", set_const("DEPTH", 7)),   # fix 1 still crashes
                                 ("depth 6 fits", set_const("DEPTH", 6))])   # fix 2 works
    runner = make_runner(d, agent, max_experiments=3, max_fix_attempts=2)
    assert run(runner, resume=False) == 0
    rows = tsv_rows(d)
    # exp 1: crashes, fix 1 crashes, fix 2 runs -> a real result under the fix's description.
    assert rows[1][4] == "depth 6 fits" and rows[1][3] in ("keep", "discard")
    assert float(rows[1][1]) == pytest.approx(fake_val_of(repo.git.show(f"{rows[1][0]}:train_mlx.py")))
    assert len(agent.fix_logs) == 3 and "out of memory" in agent.fix_logs[0]
    # exp 2: crashes, no fixes left in the script -> crash row, reset to the best.
    assert rows[2][3] == "crash" and rows[2][1] == "0.000000" and rows[2][4] == "deeper again"
    results = ledger_records(d, "result")
    assert results[1]["fix_attempts"] == 2 and results[1]["cost_usd"] == pytest.approx(0.014)
    best = Ledger(d, "t").best()
    assert repo.head.commit.hexsha == best["commit"]


def test_timeout_kills_the_whole_process_group(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    (d / "train_mlx.py").write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "print('training...', flush=True)\n"
        "time.sleep(60)\n")
    trainer = Trainer.for_backend("mlx")
    trainer.confinement = Confinement(sandbox="none", reason="test")   # host pids, a file outside the repo
    outcome = trainer.run(d, d / "run.log", timeout_s=1.0)
    assert outcome.timed_out and not outcome.ok and outcome.seconds < 20
    child = int((tmp_path / "child.pid").read_text())
    assert not _alive(child), "the trainer's child survived the timeout"
    assert "training..." in (d / "run.log").read_text() and "timeout" in outcome.log_tail
    assert "unsandboxed run: test" in (d / "run.log").read_text()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_scales_with_the_profile(monkeypatch):
    assert timeout_for(300) == 600            # upstream: 10 minutes for a 5-minute budget
    assert timeout_for(15) == 135             # short profiles keep start-up slack
    monkeypatch.setenv("AUTORESEARCH_TIMEOUT", "7")
    assert timeout_for(300) == 7


def test_parse_summary_reads_the_last_block():
    log = "noise\n---\nval_bpb: 9.0\n" + "step 5\n---\nval_bpb:          0.997900\npeak_vram_mb:     45060.2\n" \
          "num_steps:        953\ndevice:           Apple M3 Max (gpu)\neval_tokens:      20971520\n"
    s = parse_summary(log)
    assert s["val_bpb"] == 0.9979 and s["peak_vram_mb"] == 45060.2 and s["num_steps"] == 953
    assert s["device"] == "Apple M3 Max (gpu)" and s["eval_tokens"] == 20971520
    assert parse_summary("Traceback...\nRuntimeError: boom\n") is None
    assert parse_summary("---\nval_bpb: nan-ish\n") is None


def test_decide_rule_is_replaceable(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    calls = []

    def always_discard(val, best):
        calls.append((val, best))
        return "discard"

    runner = make_runner(d, ScriptedAgent([("lr up", set_const("MATRIX_LR", 0.06))]), max_experiments=1)
    runner.decide = always_discard
    run(runner, resume=False)
    assert tsv_rows(d)[1][3] == "discard" and len(calls) == 1
    assert decide_greedy(1.0, 1.1) == "keep" and decide_greedy(1.1, 1.1) == "discard"


def test_backend_detection(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cuda")
    assert detect_backend() == "cuda"
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "tpu")
    with pytest.raises(SetupError, match="mlx, cuda"):
        detect_backend()
    monkeypatch.delenv("AUTORESEARCH_BACKEND")
    # No nvidia-smi on PATH: mlx. A fake nvidia-smi listing a GPU (and torch importable): cuda.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_backend() == "mlx"
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-x)'\n")
    smi.chmod(0o755)
    import importlib.util
    expected = "cuda" if importlib.util.find_spec("torch") else "mlx"
    if sys.platform == "darwin":
        expected = "mlx"
    assert detect_backend() == expected


def test_max_experiments_counts_the_whole_branch_and_resume_continues(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    assert run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "r",
                   "--max-experiments", "2").returncode == 0
    r = run_cli(d, "run", "--resume", "--max-experiments", "4")
    assert r.returncode == 0, r.stderr
    rows = tsv_rows(d)
    assert len(rows) == 5 and len({r[0] for r in rows}) == 5
    sessions = ledger_records(d, "session")
    assert [s["resumed"] for s in sessions] == [False, True] and sessions[1]["agent"] == "hparam"


def test_crashed_baseline_stops_then_resumes_on_the_users_fix(tmp_path):
    d = tmp_path / "p"
    repo = make_repo(d)
    text = (d / "train_mlx.py").read_text()
    (d / "train_mlx.py").write_text(text.replace("DEPTH = 4", "DEPTH = 9"))   # crashes (fake OOM)
    repo.git.commit("-qam", "too deep")
    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "b", "--max-experiments", "1")
    assert r.returncode == 3 and "baseline crashed" in r.stdout and "--resume" in r.stdout
    (d / "train_mlx.py").write_text(text)
    repo.git.commit("-qam", "fix depth")
    r = run_cli(d, "run", "--resume", "--max-experiments", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = tsv_rows(d)
    assert [(x[3], x[4]) for x in rows] == [("crash", "baseline"), ("keep", "baseline"),
                                            ("keep", "MATRIX_LR 0.04 -> 0.08")]
    assert repo.git.log("-2", "--format=%s").splitlines() == ["MATRIX_LR 0.04 -> 0.08", "fix depth"]


def test_the_attention_path_is_read_from_either_trainers_start_up_lines():
    from autoresearch.trainer import attention_path
    assert attention_path("Vocab size: 8,192\nAttention: metal_kernels\nTime budget: 300s\n") == {"path": "metal_kernels"}
    assert attention_path("Attention: mx.fast.scaled_dot_product_attention (no Metal device)\n") == \
        {"path": "mx.fast.scaled_dot_product_attention", "fallback": "no Metal device"}
    failed = ("attention: metal_kernels failed self-test (RuntimeError: [metal::Device] Unable to build metal "
              "library from source); using mx.fast.scaled_dot_product_attention\n")
    assert attention_path(failed) == {"path": "mx.fast.scaled_dot_product_attention",
                                      "fallback": "RuntimeError: [metal::Device] Unable to build metal library from source"}
    torch_log = ("Flash Attention 3 unavailable (ModuleNotFoundError: No module named 'kernels'); using torch attention\n"
                 "Device: NVIDIA H100 80GB HBM3 (cuda), attention: flex, compute dtype: bf16\n")
    assert attention_path(torch_log) == {"path": "flex", "fallback": "ModuleNotFoundError: No module named 'kernels'"}
    assert attention_path("no such lines\n") is None
