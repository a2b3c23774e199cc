"""Running one experiment: which trainer, the harness check, the subprocess, the summary.

A `Trainer` says which file the agent edits, which command trains it and how to read the
result from its log; the runner uses nothing else, so another target (a --metric mode)
only needs another Trainer.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BACKENDS = ("mlx", "cuda")
TRAINING_FILES = {"mlx": "train_mlx.py", "cuda": "train.py"}


class SetupError(RuntimeError):
    """A problem the user must fix before a run can start; the message names the fix."""


def detect_backend() -> str:
    """AUTORESEARCH_BACKEND, else mlx on Apple Silicon, cuda where an NVIDIA GPU and torch
    are present (checked without importing torch), else mlx."""
    env = os.environ.get("AUTORESEARCH_BACKEND", "").strip().lower()
    if env:
        if env not in BACKENDS:
            raise SetupError(f"AUTORESEARCH_BACKEND={env!r} is not a backend: use one of {', '.join(BACKENDS)}.")
        return env
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    if shutil.which("nvidia-smi") and importlib.util.find_spec("torch") is not None:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and "GPU" in out.stdout:
                return "cuda"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "mlx"


# -- the summary block ---------------------------------------------------------------------
_LINE = re.compile(r"^([a-z_]+):\s+(.+?)\s*$")


def parse_summary(log: str) -> dict | None:
    """The key: value block after the last '---' line of a trainer's output, or None.

    Numbers become floats (ints where integral-looking keys such as num_steps); a missing
    or non-numeric val_bpb means there is no result.
    """
    lines = log.splitlines()
    try:
        start = len(lines) - 1 - lines[::-1].index("---")
    except ValueError:
        return None
    summary = {}
    for line in lines[start + 1:]:
        m = _LINE.match(line.strip())
        if not m:
            continue
        key, value = m.groups()
        try:
            summary[key] = float(value)
            if key in ("num_steps", "depth", "eval_tokens"):
                summary[key] = int(summary[key])
        except ValueError:
            summary[key] = value
    if not isinstance(summary.get("val_bpb"), float):
        return None
    return summary


@dataclass
class RunOutcome:
    returncode: int | None          # None when killed at the timeout
    timed_out: bool
    seconds: float
    summary: dict | None
    log_tail: str

    @property
    def ok(self) -> bool:
        """A usable result: clean exit and a finite val_bpb."""
        return (self.returncode == 0 and self.summary is not None
                and math.isfinite(self.summary["val_bpb"]))


@dataclass
class Trainer:
    backend: str
    training_file: str
    command: list[str]
    parse: Callable[[str], dict | None] = parse_summary
    env: dict = field(default_factory=dict)

    @classmethod
    def for_backend(cls, backend: str) -> "Trainer":
        if backend not in BACKENDS:
            raise SetupError(f"unknown backend {backend!r}: use --backend {' or '.join(BACKENDS)}.")
        training_file = TRAINING_FILES[backend]
        # The runner itself runs inside the project's environment (`uv run autoresearch`), so
        # the same interpreter is what `uv run train_mlx.py` would use, minus uv's start-up.
        return cls(backend, training_file, [sys.executable, training_file])

    def run(self, repo_root: Path, log_path: Path, timeout_s: float,
            on_spawn: Callable[[int], None] | None = None) -> RunOutcome:
        """Train once: its own process group, all output to log_path, the whole group
        killed at the timeout (and after a normal exit, in case it left children)."""
        env = {**os.environ, **self.env}
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(self.command, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            if on_spawn:
                on_spawn(proc.pid)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc.pid, grace_s=5.0, leader=proc)
                proc.wait()
            except BaseException:      # Ctrl-C / SIGTERM of the runner: take the trainer down too
                kill_group(proc.pid, grace_s=0.0)
                proc.wait()
                raise
            finally:
                kill_group(proc.pid, grace_s=0.0)
        seconds = time.monotonic() - t0
        text = log_path.read_text(errors="replace")
        if timed_out:
            text += f"\n[autoresearch] killed after {timeout_s:.0f} s (timeout)\n"
            with open(log_path, "a") as f:
                f.write(f"\n[autoresearch] killed after {timeout_s:.0f} s (timeout)\n")
        summary = None if timed_out else self.parse(text)
        return RunOutcome(None if timed_out else proc.returncode, timed_out, seconds, summary,
                          log_tail(text))


def log_tail(text: str, lines: int = 50) -> str:
    return "\n".join(text.splitlines()[-lines:])


def kill_group(pgid: int, grace_s: float = 5.0, leader: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after grace_s. Pass the
    leader's Popen when it is our child, so that it is reaped (a zombie still counts as a
    member of the group)."""
    try:
        if grace_s > 0:
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if leader is not None:
                    leader.poll()
                if not group_alive(pgid):
                    return
                time.sleep(0.05)
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def timeout_for(time_budget_s: float) -> float:
    """Upstream kills a 5-minute run at 10 minutes: twice the budget, but at least two
    minutes of slack for start-up, compilation and evaluation on short profiles.
    AUTORESEARCH_TIMEOUT (seconds) overrides."""
    env = os.environ.get("AUTORESEARCH_TIMEOUT")
    if env:
        return float(env)
    return max(2.0 * time_budget_s, time_budget_s + 120.0)


# -- the harness check ---------------------------------------------------------------------
_HARNESS_PROBE = r"""
import json, sys
sys.path.insert(0, '.')
try:
    import prepare
except ImportError as e:
    print(json.dumps({"error": "import", "message": str(e)})); sys.exit(0)
try:
    prepare.ensure_prepared()
except prepare.HarnessError as e:
    print(json.dumps({"error": "harness", "message": str(e)})); sys.exit(0)
p = prepare.PROFILE
print(json.dumps({"profile": p.name, "seq_len": p.seq_len, "time_budget": p.time_budget,
                  "eval_tokens": p.eval_tokens, "dataset": prepare.DATASET}))
"""


def harness_info(repo_root: Path) -> dict:
    """Ask the project's prepare.py (in a child process, so its imports stay out of the
    runner) for the active profile and dataset; raise SetupError if data is missing."""
    if not (repo_root / "prepare.py").exists():
        raise SetupError(f"no prepare.py in {repo_root}: run autoresearch from the project root.")
    proc = subprocess.run([sys.executable, "-c", _HARNESS_PROBE], cwd=repo_root,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SetupError(f"checking the data with prepare.py failed:\n{proc.stderr.strip()[-2000:]}")
    info = json.loads(lines[-1])
    if info.get("error") == "harness":
        raise SetupError(info["message"])
    if info.get("error") == "import":
        raise SetupError(f"cannot import prepare.py ({info['message']}): run `uv sync` first.")
    return info
