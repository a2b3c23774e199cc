"""Scaling of `autoresearch run --workers N` on a local Ray instance.

    uv run bench/parallel.py                 # N = 1, 2, 4; 8 experiments each; 10 s runs
    uv run bench/parallel.py --workers 1 2 --experiments 4 --seconds 5

The training file sleeps a fixed time and prints a summary block (no CPU load), scored in
general mode (`--metric-cmd`), so the numbers measure the loop and Ray, not the machine.
Its score never changes, so no wave has a winner to confirm: every experiment is one run.
For each N it prints experiments per hour from the first candidate's start to the last
result (the Ray start-up and the baseline excluded), the ratio against N = 1 with the
target 0.9 N, and the overhead per experiment: wall time per experiment x N minus the run
itself. The plain local runner (no Ray) is the baseline the overhead is compared with.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

TRAINER = '''"""Sleeps, then prints a summary: a stand-in for a training run with no CPU load."""
LR = 0.04
WARMUP = 0.1
DECAY = 0.5
WIDTH = 256.0

import os
import time

time.sleep(float(os.environ["BENCH_SLEEP_S"]))
print("---")
print("val_bpb:          1.000000")
'''


def make_repo(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "train.py").write_text(TRAINER)
    (path / ".gitignore").write_text("__pycache__/\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    for cmd in (["git", "init", "-q", "-b", "master"], ["git", "add", "-A"], ["git", "commit", "-qm", "sleeper"]):
        subprocess.run(cmd, cwd=path, check=True, env=env)


def one_setting(root: Path, workers: int | None, experiments: int, seconds: float) -> dict:
    d = root / f"w{workers or 0}"
    make_repo(d)
    args = [sys.executable, "-m", "autoresearch.cli", "run", "--agent", "hparam", "--tag", "bench",
            "--max-experiments", str(experiments), "--decide", "greedy", "--metric-cmd", "python train.py",
            "--metric-regex", r"val_bpb:\s+(\S+)", "--scope", "train.py"]
    if workers:
        args += ["--workers", str(workers)]
    env = {**os.environ, "BENCH_SLEEP_S": str(seconds), "PYTHONPATH": str(PROJECT)}
    t0 = time.monotonic()
    r = subprocess.run(args, cwd=d, env=env, capture_output=True, text=True, timeout=3600)
    total = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"run with --workers {workers} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    records = [json.loads(line) for line in (d / "ledger.jsonl").read_text().splitlines()]
    starts = [x for x in records if x["event"] == "start" and x["exp"] >= 1]
    results = [x for x in records if x["event"] == "result" and x["exp"] >= 1]
    if len(results) != experiments:
        sys.exit(f"--workers {workers}: {len(results)} results, expected {experiments}")
    span = max(x["time"] for x in results) - min(x["time"] for x in starts)
    run_s = sum(x.get("run_seconds") or 0.0 for x in results) / len(results)
    return {"workers": workers or 0, "span_s": span, "total_s": total, "per_hour": experiments / span * 3600,
            "run_s": run_s, "overhead_s": span / experiments * (workers or 1) - run_s}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--experiments", type=int, default=8, help="experiments per setting (a multiple of each N)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each run sleeps")
    args = p.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        sys.exit("bench/parallel.py needs Ray: uv sync --extra ray")
    load = os.getloadavg()[0]
    print(f"{args.experiments} experiments per setting, runs sleep {args.seconds:g} s; "
          f"{os.cpu_count()} cores, load average {load:.2f} at the start")
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        root = Path(tmp)
        rows = [one_setting(root, None, args.experiments, args.seconds)]
        for n in args.workers:
            rows.append(one_setting(root, n, args.experiments, args.seconds))
            print(f"  --workers {n}: done", flush=True)
    base = next((r for r in rows if r["workers"] == 1), None)
    print(f"{'setting':>12}  {'exp/hour':>9}  {'vs N=1':>7}  {'target':>7}  {'run s':>6}  {'overhead s/exp':>14}  "
          f"{'whole run s':>11}")
    for r in rows:
        name = f"--workers {r['workers']}" if r["workers"] else "no Ray"
        ratio = r["per_hour"] / base["per_hour"] if base else float("nan")
        target = f"{0.9 * r['workers']:.1f}" if r["workers"] else "-"
        ok = "" if not r["workers"] or not base else ("  ok" if ratio >= 0.9 * r["workers"] else "  BELOW TARGET")
        print(f"{name:>12}  {r['per_hour']:>9.0f}  {ratio:>7.2f}  {target:>7}  {r['run_s']:>6.2f}  "
              f"{r['overhead_s']:>14.2f}  {r['total_s']:>11.1f}{ok}")
    local = rows[0]
    if base:
        print(f"Ray's overhead per experiment at N=1: {base['overhead_s'] - local['overhead_s']:+.2f} s over the "
              f"local runner's {local['overhead_s']:.2f} s (loop, git, sandbox and scoring per run)")


if __name__ == "__main__":
    main()
