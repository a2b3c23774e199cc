"""Parallel runs on Ray: N experiments at once on one machine's devices or on a cluster.

The runner stays the only writer of git, the ledger and the decisions. A worker is
stateless: a `Job` carries the files of the repository as the runner sees them (a tar
bundle), the hashes of the protected files, the trainer and a seed. The worker unpacks the
bundle into a scratch checkout, checks the hashes and that the dataset is prepared on its
node, and trains through `Trainer.run` -> `launch`: the same sandbox and trusted scorer as
a local run. It returns the outcome and the log.

Slots: one GPU per slot with the cuda backend (Ray's num_gpus=1); otherwise a custom
resource, `autoresearch_slot`, that the local instance declares N times and a cluster node
declares once per device (`ray start --resources '{"autoresearch_slot": 1}'` on a Mac).

Ray is imported here only, and only when the runner is given --workers or --ray-address.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import gitops
from .noise import SEED_ENV, with_seed
from .trainer import RunOutcome, SetupError, Trainer

SLOT = "autoresearch_slot"
WORKER_START_S = 120                  # a worker process that is not up by then will not come
LOG_LIMIT = 4 * 1024 * 1024           # bytes of a run's log sent back (its tail)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


@dataclass
class Job:
    bundle: bytes                     # tar of the checkout (make_bundle)
    protected: dict                   # gitops.hash_paths of the runner's checkout
    trainer: Trainer
    seed: int
    timeout_s: float
    runner_python: str                # the runner's interpreter: a worker uses its own instead
    exp: int | None = None
    die: int = 0                      # fault injection: the worker kills itself mid-run (on this many attempts)


def make_bundle(repo_root: Path, protected_untracked=()) -> bytes:
    """The checkout as the runner sees it: every tracked file's working-tree content, plus
    the untracked files of the protected folders (they are hashed as protected too)."""
    repo_root = Path(repo_root)
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, check=True).stdout
    names = sorted({n for n in listed.decode().split("\0") if n} | set(protected_untracked))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            p = repo_root / name
            if p.is_file() and not p.is_symlink():
                tar.add(p, arcname=name, recursive=False)
    return buf.getvalue()


def bundle_id(bundle: bytes) -> str:
    return hashlib.sha256(bundle).hexdigest()[:16]


def _failed(message: str) -> RunOutcome:
    return RunOutcome(returncode=1, timed_out=False, seconds=0.0, summary=None, log_tail=message, note=message)


def run_job(job: Job) -> dict:
    """On a worker: unpack, check, train. {"outcome", "log", "node"}."""
    node = socket.gethostname()
    work = Path(tempfile.mkdtemp(prefix="ar-worker-"))
    try:
        checkout, logs = work / "checkout", work / "logs"
        checkout.mkdir()
        logs.mkdir()
        with tarfile.open(fileobj=io.BytesIO(job.bundle), mode="r") as tar:
            tar.extractall(checkout, filter="data")
        subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
        subprocess.run(["git", "add", "-A"], cwd=checkout, check=True)
        hashes = gitops.hash_paths(gitops.open_repo(checkout))
        moved = sorted(p for p, h in job.protected.items() if hashes.get(p) != h)
        if moved:
            return {"outcome": _failed(f"worker on {node}: the bundle's protected files do not hash as the runner "
                                       f"recorded ({', '.join(moved)}): the bundle was damaged in transit"),
                    "log": "", "node": node}
        trainer = job.trainer
        missing = [p for p in trainer.confinement.readable if not Path(p).exists()]
        if missing:
            dataset = trainer.confinement.harness_env.get("AUTORESEARCH_DATASET", "")
            return {"outcome": _failed(f"dataset {dataset!r} is not prepared on node {node} ({missing[0]} is "
                                       f"missing): run `uv run prepare.py --dataset {dataset}` there"),
                    "log": "", "node": node}
        if trainer.command and trainer.command[0] == job.runner_python:
            trainer = dataclasses.replace(trainer, command=[sys.executable, *trainer.command[1:]])
        trainer = with_seed(trainer, job.seed)
        log_path = logs / "run.log"

        def on_spawn(pid: int) -> None:
            if job.die:
                time.sleep(0.3)
                os.kill(os.getpid(), signal.SIGKILL)
        started = time.time()
        outcome = trainer.run(checkout, log_path, job.timeout_s, on_spawn=on_spawn)
        data = log_path.read_bytes() if log_path.exists() else b""
        return {"outcome": outcome, "log": data[-LOG_LIMIT:].decode(errors="replace"), "node": node,
                "ran": {"worker": f"{node} pid {os.getpid()}", "start": round(started, 3),
                        "end": round(time.time(), 3)}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _warm_up() -> None:
    import autoresearch.trainer  # noqa: F401  (the imports a job needs)
    time.sleep(0.5)               # hold the slot, so that each slot gets a process of its own


def _check_reachable(address: str) -> None:
    """A one-line error at once for an address nothing listens on (Ray itself retries for a
    minute). "auto" and ray:// client addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise SetupError(f"--ray-address {address}: nothing answers there ({e.strerror or e}): start the cluster's head "
                         "with `ray start --head --port PORT` and pass HOST:PORT.") from None


@dataclass
class Pending:
    """A job in flight: its Ray reference and how many times it was started."""
    job: Job
    ref: object
    attempts: int = 1


class Pool:
    """N worker slots on a local Ray instance (`workers`) or an existing cluster (`address`)."""

    def __init__(self, workers: int | None, address: str | None, backend: str, out=print):
        """workers None: as many as the cluster has slots (with address), else 1."""
        # Under `uv run`, Ray would ship the current folder to every worker and start it with
        # `uv run` there (its uv hook): workers get their files from the bundle instead, and
        # the user's pyproject is not Ray's to rebuild. Read when Ray is imported.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        try:
            import ray
        except ImportError:
            raise SetupError("--workers/--ray-address need Ray: uv sync --extra ray") from None
        self.ray, self.out = ray, out
        self._tmp = None
        if address:
            _check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            except Exception as e:   # ConnectionError and Ray's own errors: one line, then stop
                raise SetupError(f"--ray-address {address}: cannot join the Ray cluster ({str(e).splitlines()[0]}); "
                                 "if it uses token authentication, set RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to "
                                 "its token.") from None
            where = f"Ray cluster at {address}"
        else:
            # a short temp dir: Ray's socket paths must stay under the OS limit of ~107 bytes
            workers = workers or 1
            self._tmp = tempfile.mkdtemp(prefix="ar-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            ray.init(num_cpus=max(workers, os.cpu_count() or 1), resources={SLOT: workers}, include_dashboard=False,
                     _temp_dir=self._tmp, log_to_driver=False, logging_level="ERROR", configure_logging=False)
            where = f"a local Ray instance ({workers} slots)"
        if backend == "cuda":
            self.options = {"num_gpus": 1, "num_cpus": 1}
            what = "one GPU per slot"
        else:
            self.options = {"num_cpus": 0, "resources": {SLOT: 1}}
            what = f"one {SLOT} per slot"
        total = ray.cluster_resources().get("GPU" if backend == "cuda" else SLOT, 0)
        if total < 1:
            ray.shutdown()
            raise SetupError(f"the Ray cluster offers no {'GPU' if backend == 'cuda' else SLOT}: start its nodes with "
                             + ("GPUs visible" if backend == "cuda" else f"`ray start --resources '{{\"{SLOT}\": 1}}'`")
                             + " (one per device).")
        workers = workers or int(total)
        self.workers = workers
        if total < workers:
            self.out(f"Note: the cluster has {total:g} slots for {workers} workers: the rest wait for a free slot.")
        if not address and sys.platform == "darwin" and workers > 1:
            self.out(f"Note: the {workers} runs share this Mac's one GPU, so each is slower and noisier than alone; "
                     "for one device per slot, add Macs to a cluster (README: Parallel runs).")
        self.threads = None
        if not address and backend != "cuda":
            cores = os.cpu_count() or 1
            self.threads = max(1, cores // workers)    # CPU slots split the cores
        self._remote = ray.remote(run_job).options(max_retries=0, **self.options)
        self._pending_seeded: dict[tuple, Pending] = {}
        # start the worker processes now, one per slot, rather than inside the first wave
        warm = ray.remote(_warm_up).options(max_retries=0, **self.options)
        try:
            ray.get([warm.remote() for _ in range(min(workers, int(total)))], timeout=WORKER_START_S)
        except ray.exceptions.GetTimeoutError:
            logs = f"{self._tmp}/session_latest/logs" if self._tmp else "the logs of the cluster's nodes"
            ray.shutdown()            # the temporary folder stays: its logs say why
            raise SetupError(f"Ray started no worker within {WORKER_START_S} s (see {logs}): a worker's runtime "
                             "environment failed; with `uv run`, leave RAY_ENABLE_UV_RUN_RUNTIME_ENV unset.") from None
        self.out(f"Workers: {workers} experiments at once on {where}, {what}.")

    def job(self, trainer: Trainer, bundle: bytes, protected: dict, seed: int, timeout_s: float,
            exp: int | None = None, die: int = 0) -> Job:
        if self.threads is not None:
            trainer = dataclasses.replace(trainer, env={**trainer.env,
                                                        **{v: str(self.threads) for v in THREAD_VARS}})
        return Job(bundle, protected, trainer, seed, timeout_s, sys.executable, exp=exp, die=die)

    def submit(self, job: Job) -> Pending:
        return Pending(job, self._remote.remote(job))

    def wait(self, pending: list[Pending]) -> list[Pending]:
        """The jobs of `pending` that have finished: at least one."""
        if not pending:
            return []
        refs = [p.ref for p in pending]
        done, _ = self.ray.wait(refs, num_returns=1)
        done = set(done)
        return [p for p in pending if p.ref in done]

    def result(self, p: Pending) -> dict:
        """The job's {"outcome", "log", "node", "retried"}; a job whose worker died is started once
        more (wherever Ray finds a slot), and a second death is a crash."""
        errors = self.ray.exceptions
        while True:
            try:
                r = self.ray.get(p.ref)
                r["retried"] = p.attempts - 1
                return r
            except (errors.WorkerCrashedError, errors.NodeDiedError, errors.RayActorError,
                    errors.LocalRayletDiedError, errors.ObjectLostError, errors.OwnerDiedError) as e:
                why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                if p.attempts >= 2:
                    msg = f"the worker died twice ({type(e).__name__}: {why})"
                    return {"outcome": _failed(msg), "log": msg, "node": "", "retried": p.attempts - 1}
                self.out(f"[{p.job.exp}] the worker died ({type(e).__name__}); starting the run once more.")
                p.job = dataclasses.replace(p.job, die=max(0, int(p.job.die) - 1))
                p.ref, p.attempts = self._remote.remote(p.job), p.attempts + 1
            except errors.RayTaskError as e:    # run_job itself raised: a bug or a node problem, not the run
                cause = getattr(e, "cause", None) or e
                msg = f"the worker failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}"
                return {"outcome": _failed(msg), "log": msg, "node": "", "retried": p.attempts - 1}

    def run(self, job: Job) -> dict:
        """Run one job and wait for it (a prefetched one with the same bundle and seed is reused)."""
        key = (bundle_id(job.bundle), job.seed)
        p = self._pending_seeded.pop(key, None) or self.submit(job)
        return self.result(p)

    def prefetch(self, jobs: list[Job]) -> None:
        """Start jobs now that `run` will ask for later (re-runs, noise-floor runs), so that they
        use free slots at once."""
        for job in jobs:
            key = (bundle_id(job.bundle), job.seed)
            if key not in self._pending_seeded:
                self._pending_seeded[key] = self.submit(job)

    def drop_prefetched(self) -> None:
        """Cancel prefetched jobs nobody asked for (e.g. re-runs of a change already discarded)."""
        for p in self._pending_seeded.values():
            self.cancel(p)
        self._pending_seeded.clear()

    def cancel(self, p: Pending) -> None:
        try:
            self.ray.cancel(p.ref, force=True)
        except Exception:
            pass

    def shutdown(self) -> None:
        """Stop every worker (their trainers die with their sandboxes) and the local instance."""
        self.drop_prefetched()
        try:
            self.ray.shutdown()
        finally:
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)


@dataclass
class RemoteTrainer(Trainer):
    """The runner's trainer, run on the pool: `run` ships the checkout as it is now (the
    runner has checked out the commit to run) and waits. Used for the baseline, noise-floor
    runs and re-runs, so they take the same path as the candidates."""
    pool: Pool | None = None
    inner: Trainer | None = None
    protected: dict = dataclasses.field(default_factory=dict)
    protected_untracked: tuple = ()

    @classmethod
    def wrap(cls, trainer: Trainer, pool: Pool) -> "RemoteTrainer":
        fields = {f.name: getattr(trainer, f.name) for f in dataclasses.fields(Trainer)}
        remote = cls(**fields, pool=pool, inner=trainer)
        for extra in ("metric_name", "direction", "scope", "harness", "judge"):
            if hasattr(trainer, extra) and not hasattr(Trainer, extra):
                object.__setattr__(remote, extra, getattr(trainer, extra))
        return remote

    def _inner(self) -> Trainer:
        # with_seed (dataclasses.replace) sets env on this object: carry it to the real trainer
        return dataclasses.replace(self.inner, env={**self.inner.env, **self.env},
                                   confinement=self.confinement, kernel_seed=self.kernel_seed)

    def job_for(self, repo_root: Path, timeout_s: float, seed: int | None = None, bundle: bytes | None = None,
                exp: int | None = None, die: int = 0) -> Job:
        seed = int(self.env.get(SEED_ENV, os.environ.get(SEED_ENV, "42"))) if seed is None else seed
        bundle = make_bundle(repo_root, self.protected_untracked) if bundle is None else bundle
        return self.pool.job(self._inner(), bundle, self.protected, seed, timeout_s, exp=exp, die=die)

    def prefetch(self, repo_root: Path, seeds: list[int], timeout_s: float) -> None:
        bundle = make_bundle(repo_root, self.protected_untracked)
        self.pool.prefetch([self.job_for(repo_root, timeout_s, seed=s, bundle=bundle) for s in seeds])

    def run(self, repo_root: Path, log_path: Path, timeout_s: float, on_spawn=None) -> RunOutcome:
        r = self.pool.run(self.job_for(repo_root, timeout_s))
        Path(log_path).write_text(r["log"])
        return r["outcome"]
