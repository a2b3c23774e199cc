"""Runner overhead per experiment: git, checks, parsing, logging — agent and training excluded.

Runs the real runner in-process on a temp git repository with the fast fake trainer
(tests/loop_fixtures) and the offline hparam agent, times every experiment, and subtracts
the time spent inside the agent and inside the trainer subprocess. The rest is what the
runner itself costs. Measured twice: with a fresh ledger, and with 1000 earlier results in
it (several nights of a run) to show it does not grow with history.

Target (issue 6): under 1 s per experiment. Printed as a ratio to that target, and, as a
machine-speed reference measured in this same process, in units of one `git status`.

    uv run python bench/runner_overhead.py [--experiments 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from autoresearch.agents.hparam import HparamAgent  # noqa: E402
from autoresearch.ledger import Ledger  # noqa: E402
from autoresearch.runner import RunConfig, Runner  # noqa: E402
from autoresearch.trainer import Trainer  # noqa: E402
from loop_fixtures.helpers import make_repo  # noqa: E402

TARGET_S = 1.0


class TimedAgent(HparamAgent):
    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    def propose(self, ctx):
        t0 = time.perf_counter()
        try:
            return super().propose(ctx)
        finally:
            self.seconds += time.perf_counter() - t0


class TimedTrainer(Trainer):
    seconds = 0.0

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return super().run(*args, **kwargs)
        finally:
            TimedTrainer.seconds += time.perf_counter() - t0


def prefill(ledger: Ledger, n: int) -> None:
    """n earlier discarded results (plus their start records) for this tag."""
    lines = []
    for i in range(n):
        base = {"time": time.time(), "tag": ledger.tag, "exp": 1000 + i, "commit": "f" * 40}
        lines.append(json.dumps({"event": "start", **base, "description": f"old idea {i}"}))
        lines.append(json.dumps({"event": "result", **base, "commit_short": "fffffff", "val_bpb": 2.0,
                                 "memory_gb": 1.0, "status": "discard", "description": f"old idea {i}",
                                 "cost_usd": 0.0, "baseline": False, "summary": {"val_bpb": 2.0}}))
    with open(ledger.path, "a") as f:
        f.write("\n".join(lines) + "\n")


def measure(experiments: int, history: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "p"
        make_repo(d)
        agent = TimedAgent()
        trainer = TimedTrainer(**vars(Trainer.for_backend("mlx")))
        runner = Runner(d, RunConfig(tag="bench", backend="mlx"), agent, trainer, out=lambda s: None)
        runner.start()
        runner.baseline()
        if history:
            prefill(runner.ledger, history)
        overheads = []
        for _ in range(experiments):
            agent.seconds, TimedTrainer.seconds = 0.0, 0.0
            t0 = time.perf_counter()
            runner.experiment()
            total = time.perf_counter() - t0
            overheads.append(total - agent.seconds - TimedTrainer.seconds)
        return overheads


def git_status_seconds(repeats: int = 10) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "p"
        make_repo(d)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(["git", "status", "--porcelain"], cwd=d, capture_output=True, check=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=20)
    args = ap.parse_args()
    ref = git_status_seconds()
    print(f"reference: one `git status` = {ref * 1000:.1f} ms (this machine, now)")
    for history in (0, 1000):
        o = measure(args.experiments, history)
        med, worst = statistics.median(o), max(o)
        print(f"history {history:>4} results: runner overhead per experiment median {med * 1000:.0f} ms, "
              f"max {worst * 1000:.0f} ms over {len(o)} experiments | "
              f"ratio to the 1 s target: {med / TARGET_S:.3f} (max {worst / TARGET_S:.3f}) | "
              f"= {med / ref:.0f} git-status calls")


if __name__ == "__main__":
    main()
