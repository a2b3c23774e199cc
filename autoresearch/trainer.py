"""Running one experiment: which trainer, the harness check, the subprocess, the summary.

A `Trainer` says which file the agent edits, which command trains it and how to read the
result from its log; the runner uses nothing else, so another target (a --metric mode)
only needs another Trainer.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import gitops

SCORER_FD_ENV = "AUTORESEARCH_SCORER_FD"   # = harness.scorer.SCORER_FD_ENV

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


_STEP_LINE = re.compile(r"step (\d+)\b.*?\bloss: ([0-9.eE+-]+).*?\bdt: ([0-9.]+)ms.*?\btok/sec: ([0-9,]+)")
CURVE_POINTS = 200


def step_curve(log: str, points: int = CURVE_POINTS) -> list[list[float]]:
    """[step, loss, tokens/s, elapsed s] from the trainers' progress lines (elapsed sums the
    steps' dt), thinned evenly to at most `points` rows, the last one always kept: the loss
    curve the morning report draws. [] when the log has no such lines."""
    rows, elapsed = [], 0.0
    for m in _STEP_LINE.finditer(log):
        step, loss, dt_ms, tok = m.groups()
        elapsed += float(dt_ms) / 1000
        try:
            rows.append([int(step), float(loss), int(tok.replace(",", "")), round(elapsed, 3)])
        except ValueError:
            continue
    return thin_evenly(rows, points)


def thin_evenly(rows: list, points: int) -> list:
    """At most `points` of rows, evenly spaced, the last one always kept."""
    if len(rows) <= points:
        return rows
    stride = len(rows) / points
    return [rows[int(i * stride)] for i in range(points - 1)] + [rows[-1]]


_ATTENTION_LINES = (   # (pattern, group of the path, group of the fallback reason)
    (re.compile(r"^attention: metal_kernels failed self-test \((.*)\); using (\S+)"), 2, 1),   # train_mlx.py
    (re.compile(r"^Attention: (\S+)(?: \((.*)\))?$"), 1, 2),                                  # train_mlx.py
    (re.compile(r"^Flash Attention 3 unavailable \((.*)\); using torch attention"), None, 1),  # train.py
    (re.compile(r"^Device: .*\battention: (fa3|flex|sdpa)\b"), 1, None),                      # train.py
)


def attention_path(log: str) -> dict | None:
    """{"path": the attention the run took, "fallback": why not the fast one} from the
    trainer's start-up lines, or None when it printed none."""
    path = fallback = None
    for line in log.splitlines():
        for pattern, path_group, why_group in _ATTENTION_LINES:
            m = pattern.match(line.strip())
            if m:
                path = m.group(path_group) if path_group else path
                fallback = (m.group(why_group) if why_group else None) or fallback
                break
    if path is None:
        return None
    return {"path": path, **({"fallback": fallback} if fallback else {})}


@dataclass
class RunOutcome:
    returncode: int | None          # None when killed at the timeout
    timed_out: bool
    seconds: float
    summary: dict | None
    log_tail: str
    sandbox: str = "none"           # how the run was confined: bwrap | sandbox-exec | none
    scored: dict | None = None      # the trusted scorer's result, when the run was scored by it
    tampered: list = field(default_factory=list)   # what the run changed outside its scratch (undone)
    note: str = ""                  # why a run that exited cleanly has no result (general mode's metric)
    attention: dict | None = None   # the attention path the trainer says it took, and why it fell back
    curve: list = field(default_factory=list)      # step_curve of its log: [step, loss, tok/s, elapsed]

    @property
    def ok(self) -> bool:
        """A usable result: clean exit, a finite val_bpb, nothing tampered with."""
        return (self.returncode == 0 and self.summary is not None and not self.tampered
                and math.isfinite(self.summary["val_bpb"]))

    @property
    def value(self) -> float:
        """The number that decides: the scorer's when it scored the run, else the summary's."""
        if self.scored and isinstance(self.scored.get("val_bpb"), float):
            return self.scored["val_bpb"]
        return self.summary["val_bpb"]

    @property
    def problem(self) -> str:
        """One line on why the run gave no usable result."""
        if self.tampered:
            return "changed " + "; ".join(self.tampered[:3]) + " (undone)"
        if self.scored and self.scored.get("invalid"):
            return f"scorer: {self.scored['invalid']}"
        if self.note:
            return self.note
        return "timed out" if self.timed_out else f"crashed (exit {self.returncode})"


@dataclass
class Trainer:
    backend: str
    training_file: str
    command: list[str]
    parse: Callable[[str], dict | None] = parse_summary
    env: dict = field(default_factory=dict)
    confinement: "Confinement" = field(default_factory=lambda: Confinement())
    kernel_seed: str | None = None    # kernel_key of the user's start file (see launch)

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
        """Launch one run and return its scored outcome: see `launch`."""
        training = Path(repo_root) / self.training_file
        key = kernel_key(training.read_bytes()) if training.is_file() else None
        return launch(self.command, repo_root, log_path, timeout_s, env={**os.environ, **self.env},
                      confinement=self.confinement, parse=self.parse, on_spawn=on_spawn, kernel_cache_key=key,
                      kernel_seed_key=self.kernel_seed)


def kernel_key(training_file: bytes) -> str:
    """Which kernel cache a training file's runs use: a hash of its bytes."""
    return hashlib.sha256(training_file).hexdigest()[:32]


@dataclass
class Confinement:
    """How the runner confines every run it starts (the same for local and remote runs)."""
    sandbox: str | None = None        # bwrap | sandbox-exec | none; None: detect at the first run
    reason: str = ""                  # why there is no sandbox, when there is none
    require_sandbox: bool = False
    allow_network: bool = False
    scorer: bool = False              # val_bpb runs: score with the trusted scorer (harness/scorer.py)
    readable: tuple = ()              # data the run may read (training shards, tokenizer)
    hidden: tuple = ()                # paths that must be absent in the run (the validation shard)
    harness_env: dict = field(default_factory=dict)   # pins the run's cache root and dataset


def launch(command: list[str], repo_root: Path, log_path: Path, timeout_s: float, env: dict,
           confinement: Confinement, parse: Callable[[str], dict | None] = parse_summary,
           on_spawn: Callable[[int], None] | None = None, kernel_cache_key: str | None = None,
           kernel_seed_key: str | None = None) -> RunOutcome:
    """The one launch-and-score path: sandbox the command, start the trusted scorer beside it
    (val_bpb runs), train in its own process group with all output to log_path, kill the
    whole group at the timeout, then check that the run changed nothing outside its scratch
    (undoing what it did) and read the scorer's result.

    `kernel_cache_key` (a hash of the training file): MLX's compiled CPU kernels of an earlier
    run of the same bytes are copied into this run's scratch, and this run's are kept for
    the next run of the same bytes (noise runs, re-runs). Never across files the agent wrote:
    a run could plant a kernel that changes what a later, innocent file computes. A file's
    first run starts instead from the kernels of `kernel_seed_key`, the user's own start file
    (compiling them costs a CPU run about 40 s); only that file's runs ever write its cache."""
    from harness import sandbox as sandboxes
    repo_root = Path(repo_root).resolve()
    private = Path(tempfile.mkdtemp(prefix="autoresearch-run-"))
    before = gitops.snapshot(repo_root)
    scorer = None
    try:
        sb = sandboxes.plan(repo_root, private / "scratch", readable=confinement.readable,
                            hidden=[*confinement.hidden, *gitops.run_output_paths(repo_root)],
                            allow_network=confinement.allow_network, require=confinement.require_sandbox,
                            kind=confinement.sandbox)
        run_env = sb.env({**env, **confinement.harness_env})
        kernels, seed = _kernel_caches(repo_root, kernel_cache_key, kernel_seed_key)
        start_from = kernels if kernels is not None and kernels.is_dir() else seed
        if start_from is not None and start_from.is_dir():
            shutil.copytree(start_from, private / "scratch" / "tmp" / "mlx", dirs_exist_ok=True, symlinks=True)
        pass_fds = ()
        if confinement.scorer:
            scorer, trainer_end = _start_scorer(repo_root, private, {**env, **confinement.harness_env})
            run_env[SCORER_FD_ENV] = str(trainer_end.fileno())
            pass_fds = (trainer_end.fileno(),)
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            if sb.kind == "none":
                log.write(f"[autoresearch] unsandboxed run: {confinement.reason or sb.reason}\n".encode())
                log.flush()
            proc = subprocess.Popen(sb.wrap(command), cwd=repo_root, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=run_env, start_new_session=True,
                                    pass_fds=pass_fds)
            if confinement.scorer:
                trainer_end.close()      # the trainer holds its end; the scorer sees EOF when it exits
            if on_spawn:
                on_spawn(proc.pid)
            books = gitops.read_books(repo_root)     # after the runner's own spawn record
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
        scored = _finish_scorer(scorer) if scorer else None
        scorer = None
        text = log_path.read_text(errors="replace")
        if timed_out:
            note = f"\n[autoresearch] killed after {timeout_s:.0f} s (timeout)\n"
            text += note
            with open(log_path, "a") as f:
                f.write(note)
        tampered = gitops.restore_books(repo_root, books) + gitops.undo_changes(repo_root, before)
        if tampered:
            note = "\n[autoresearch] the run changed " + "; ".join(tampered) + " (undone; the run is invalid)\n"
            text += note
            with open(log_path, "a") as f:
                f.write(note)
        summary = None if timed_out else parse(text)
        built = private / "scratch" / "tmp" / "mlx"
        if kernels is not None and not kernels.exists() and built.is_dir():
            shutil.copytree(built, kernels, symlinks=True)
        return RunOutcome(None if timed_out else proc.returncode, timed_out, seconds, summary, log_tail(text),
                          sandbox=sb.kind, scored=scored, tampered=tampered, attention=attention_path(text),
                          curve=step_curve(text))
    finally:
        if scorer:
            scorer[0].kill()
            scorer[0].wait()
        shutil.rmtree(private, ignore_errors=True)


KERNEL_CACHES_KEPT = 8


def _kernel_caches(repo_root: Path, *keys: str | None) -> list[Path | None]:
    """Where the MLX kernels of each training file's runs are kept (inside .git, which no
    sandboxed run can see), one path per key (None for None); the oldest caches beyond
    KERNEL_CACHES_KEPT are removed, except these."""
    if all(key is None for key in keys):
        return [None for _ in keys]
    try:
        base = gitops.git_dir_of(repo_root) / "autoresearch-kernels"
    except subprocess.CalledProcessError:
        return [None for _ in keys]
    base.mkdir(exist_ok=True)
    caches = sorted(base.iterdir(), key=lambda p: p.stat().st_mtime)
    for old in caches[:-KERNEL_CACHES_KEPT]:
        if old.name not in keys:
            shutil.rmtree(old, ignore_errors=True)
    return [base / key if key is not None else None for key in keys]


def _start_scorer(repo_root: Path, private: Path, env: dict):
    """The scorer process (not sandboxed; it never runs the training file) and the socket end
    the trainer inherits. Its .pyc cache is private: a .pyc left in the repository is never read."""
    runner_end, trainer_end = socket.socketpair()
    env = {**env, "PYTHONPYCACHEPREFIX": str(private / "scorer-pycache"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(SCORER_FD_ENV, None)
    proc = subprocess.Popen([sys.executable, "-B", "-m", "harness.scorer", "--fd", str(runner_end.fileno())],
                            cwd=repo_root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=open(private / "scorer.log", "wb"), pass_fds=(runner_end.fileno(),),
                            start_new_session=True)
    runner_end.close()
    return (proc, private / "scorer.log"), trainer_end


def _finish_scorer(scorer, wait_s: float = 60.0) -> dict:
    proc, errors = scorer
    try:
        out, _ = proc.communicate(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"invalid": f"the scorer did not finish within {wait_s:.0f} s of the run's end"}
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = errors.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": "the scorer failed: " + (" | ".join(tail) or f"exit {proc.returncode}")}
    return result


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
        try:
            value = float(env)
        except ValueError:
            value = float("nan")
        if not value > 0 or not math.isfinite(value):
            raise SetupError(f"AUTORESEARCH_TIMEOUT={env!r}: give the seconds after which a run is killed, e.g. 900.")
        return value
    return max(2.0 * time_budget_s, time_budget_s + 120.0)


# -- the harness check ---------------------------------------------------------------------
_HARNESS_PROBE = r"""
import json, os, sys
sys.path.insert(0, '.')
try:
    import prepare
except ImportError as e:
    print(json.dumps({"error": "import", "message": str(e)})); sys.exit(0)
try:
    prepare.ensure_prepared()
except prepare.HarnessError as e:
    print(json.dumps({"error": "harness", "message": str(e)})); sys.exit(0)
p, d = prepare.PROFILE, prepare.DATASET
info = {"profile": p.name, "seq_len": p.seq_len, "time_budget": p.time_budget, "eval_tokens": p.eval_tokens,
        "dataset": d, "scorer": hasattr(prepare, "SCORER_FD_ENV")}
if hasattr(prepare, "data_dir"):   # where the sandbox finds the data (a fake harness has none)
    info.update(cache_dir=prepare.CACHE_DIR, data_dir=prepare.data_dir(d), tokenizer_dir=prepare.tokenizer_dir(d),
                val_path=os.path.join(prepare.data_dir(d), prepare.val_filename(d)))
print(json.dumps(info))
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


def confine(trainer: Trainer, harness: dict, sandbox: str | None = None, require_sandbox: bool = False,
            allow_network: bool = False) -> Confinement:
    """Set how every run of `trainer` is confined: the sandbox, and for val_bpb runs the data
    it may read (training shards, tokenizer), the validation shard it may not, and the scorer."""
    if sandbox is None and os.environ.get("AUTORESEARCH_SANDBOX", "auto") not in ("", "auto"):
        sandbox = os.environ["AUTORESEARCH_SANDBOX"]
        if sandbox != "none":
            raise SetupError(f"AUTORESEARCH_SANDBOX={sandbox!r}: use auto (the default) or none.")
    c = Confinement(sandbox=sandbox, require_sandbox=require_sandbox, allow_network=allow_network)
    if harness.get("mode") != "metric" and harness.get("data_dir"):
        c.readable = (harness["data_dir"], harness["tokenizer_dir"])
        c.hidden = (harness["val_path"],)
        c.harness_env = {"AUTORESEARCH_CACHE": harness["cache_dir"], "AUTORESEARCH_DATASET": harness["dataset"],
                         "AUTORESEARCH_PROFILE": harness["profile"]}
        c.scorer = bool(harness.get("scorer"))
    trainer.confinement = c
    if sandbox is None:
        from harness.sandbox import detect
        c.sandbox, c.reason = detect(allow_network)
    elif sandbox == "none":
        c.reason = "turned off (AUTORESEARCH_SANDBOX=none)"
    if c.sandbox == "none" and require_sandbox:
        raise SetupError(f"--require-sandbox: no sandbox can run here: {c.reason}. Install bubblewrap "
                         "(apt install bubblewrap) or drop --require-sandbox.")
    harness["sandbox"] = c.sandbox
    if c.reason:
        harness["sandbox_reason"] = c.reason
    return c
