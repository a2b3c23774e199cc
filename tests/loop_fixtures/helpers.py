"""Temp project repositories and runner invocations shared by the loop tests."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import git

from autoresearch.agents import Agent, AgentFailed, Proposal

HERE = Path(__file__).parent
PROJECT = HERE.parent.parent


def make_repo(path: Path, training_file: str = "train_mlx.py") -> git.Repo:
    """A committed project checkout: fake trainer as the training file, fake prepare.py."""
    path.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(path, initial_branch="master")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Test")
        cw.set_value("user", "email", "test@example.com")
    shutil.copy(HERE / "fake_train.py", path / training_file)
    shutil.copy(HERE / "fake_prepare.py", path / "prepare.py")
    (path / "program.md").write_text("# program\nLower val_bpb. Edit only the training file.\n")
    (path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (path / ".gitignore").write_text("__pycache__/\n")
    repo.git.add("-A")
    repo.git.commit("-q", "-m", "initial")
    return repo


def commit_all(path: Path, message: str) -> git.Repo:
    """`git init` (if needed) and commit everything in path, as a test user."""
    repo = git.Repo.init(path, initial_branch="master")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Test")
        cw.set_value("user", "email", "test@example.com")
    repo.git.add("-A")
    repo.git.commit("-q", "-m", message)
    return repo


def real_harness_repo(tmp_path: Path) -> Path:
    """A project checkout with the REAL prepare.py and harness/, and a tiny untrained MLX model
    (tests/decide_fixtures/tiny_train.py) as the training file."""
    d = tmp_path / "real"
    d.mkdir()
    shutil.copy(PROJECT / "prepare.py", d / "prepare.py")
    shutil.copytree(PROJECT / "harness", d / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(HERE.parent / "decide_fixtures" / "tiny_train.py", d / "train_mlx.py")
    (d / "program.md").write_text("# program\n")
    (d / ".gitignore").write_text("__pycache__/\n")
    commit_all(d, "tiny trainer on the real harness")
    return d


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "FAKE_", "ANTHROPIC_"))}
    env["PYTHONPATH"] = str(PROJECT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def ctrl_c_default() -> None:
    """Popen preexec_fn for a child a test stops with SIGINT: a job started in the background
    by a non-interactive shell (as CI may be) inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt, so the child would not see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(repo_dir: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`autoresearch ARGS` as a real subprocess, in repo_dir."""
    return subprocess.run([sys.executable, "-m", "autoresearch.cli", *args], cwd=repo_dir,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def ledger_records(repo_dir: Path, event: str | None = None) -> list[dict]:
    p = repo_dir / "ledger.jsonl"
    recs = [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []
    return [r for r in recs if event is None or r["event"] == event]


def tsv_rows(repo_dir: Path) -> list[list[str]]:
    lines = (repo_dir / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    return [l.split("\t") for l in lines[1:]]


def fake_val_of(text: str) -> float:
    """val_bpb the fake trainer prints for a given training-file text."""
    ns: dict = {}
    code = text.split("import math")[0]
    exec(code, ns)
    import math
    return round(1.0 + 0.5 * math.log(ns["MATRIX_LR"] / 0.09) ** 2 + 0.1 * math.log(ns["EMBEDDING_LR"] / 0.6) ** 2
                 + 0.2 * (ns["WARMDOWN_RATIO"] - 0.6) ** 2 + 0.01 * abs(ns["DEPTH"] - 5), 6)


class ScriptedAgent(Agent):
    """A deterministic agent for runner tests: one scripted edit per experiment, each
    (description, new file text or a function old text -> new text)."""
    name = "scripted"

    def __init__(self, edits):
        self.edits = list(edits)

    def propose(self, ctx):
        if not self.edits:
            raise AgentFailed("script exhausted")
        desc, change = self.edits.pop(0)
        path = ctx.training_path
        path.write_text(change(path.read_text()) if callable(change) else change)
        return Proposal(description=desc)
