"""The noise floor: the same training file run K times with different seeds.

`autoresearch noise` runs the current training file K times, seed AUTORESEARCH_SEED + i for
run i (default seed 42), and appends a `noise` record (values, seeds, mean, std) to the
ledger. The noise-aware keep rule (decide.py) reads the latest comparable record; a run
that starts without one measures it on its baseline (--noise-runs).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from .decide import DEFAULT_NOISE_RUNS, blob_id, spread

SEED_ENV = "AUTORESEARCH_SEED"
DEFAULT_SEED = 42


def base_seed() -> int:
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return DEFAULT_SEED
    try:
        return int(raw)
    except ValueError:
        from .trainer import SetupError
        raise SetupError(f"{SEED_ENV}={raw!r} is not an integer: set it to a whole number (e.g. 42).") from None


def with_seed(trainer, seed: int):
    """The same trainer with AUTORESEARCH_SEED set for its process."""
    return dataclasses.replace(trainer, env={**trainer.env, SEED_ENV: str(seed)})


def measure(trainer, repo_root: Path, runs: int, timeout_s: float, log_dir: Path | None = None,
            first_seed: int | None = None,
            check: Callable[[object], str | None] | None = None,
            on_run: Callable[[int, int, object, str | None], None] | None = None,
            on_spawn: Callable[[int], None] | None = None) -> tuple[list[float], list[int], list[str]]:
    """Run the training file `runs` times with seeds first_seed, first_seed+1, ...

    Returns (values, seeds, problems): the val_bpb of each usable run, its seed, and a line
    for each run that crashed or failed `check` (the integrity check)."""
    first_seed = base_seed() if first_seed is None else first_seed
    log_dir = Path(log_dir or repo_root)
    values, seeds, problems = [], [], []
    for i in range(runs):
        seed = first_seed + i
        outcome = with_seed(trainer, seed).run(repo_root, log_dir / f"run.seed{seed}.log", timeout_s,
                                               on_spawn=on_spawn)
        problem = None
        if not outcome.ok:
            problem = outcome.problem
        elif check:
            problem = check(outcome)
        if on_run:
            on_run(i, seed, outcome, problem)
        if problem:
            problems.append(f"seed {seed}: {problem}")
            continue
        values.append(outcome.value)
        seeds.append(seed)
    return values, seeds, problems


def noise_record(ledger, trainer, harness: dict, backend: str, values: list[float], seeds: list[int],
                 problems: list[str], repo_root: Path, source: str, **extra) -> dict:
    """Append the `noise` ledger record and return it."""
    stats = spread(values)
    return ledger.append("noise", source=source, backend=backend, harness=harness,
                         training_file=trainer.training_file,
                         blob=blob_id(repo_root, trainer.training_file), values=values, seeds=seeds,
                         problems=problems, **stats, **extra)


def format_noise(record: dict, metric: str = "val_bpb") -> str:
    if record.get("std") is None:
        return f"noise floor: {record['n']} usable run(s), not enough for a spread"
    vals = ", ".join(f"{v:.6f}" for v in record["values"])
    return (f"noise floor of {record['training_file']} ({record['n']} runs, seeds {record['seeds'][0]}.."
            f"{record['seeds'][-1]}): {metric} mean {record['mean']:.6f}, std {record['std']:.6f}, "
            f"range {record['max'] - record['min']:.6f} [{vals}]")


def cmd_noise(args, trainer, harness: dict, ledger, repo_root: Path, out=print) -> int:
    """`autoresearch noise`: K runs of the current file, recorded in the ledger."""
    from .trainer import SetupError, timeout_for
    runs = args.runs if args.runs is not None else DEFAULT_NOISE_RUNS
    if runs < 2:
        raise SetupError(f"--runs {runs}: a spread needs at least 2 runs.")
    timeout = timeout_for(float(harness.get("time_budget", 300)))
    target = (f"metric {getattr(trainer, 'metric_name', 'score')}" if harness.get("mode") == "metric"
              else f"profile {harness.get('profile')}, dataset {harness.get('dataset')}")
    out(f"Running {trainer.training_file} {runs} times (seeds {base_seed()}..{base_seed() + runs - 1}, {target}).")

    steps = []      # optimizer steps of each usable run: on a fixed time budget, most of the noise

    def on_run(i, seed, outcome, problem):
        shown = f"{outcome.value:.6f}" if outcome.ok else "-"
        n = (outcome.summary or {}).get("num_steps")
        if outcome.ok and not problem and isinstance(n, int):
            steps.append(n)
        out(f"  run {i + 1}/{runs} seed {seed}: {shown} ({outcome.seconds:.1f} s"
            + (f", {n} steps" if isinstance(n, int) else "") + ")" + (f"  {problem}" if problem else ""))

    values, seeds, problems = measure(trainer, repo_root, runs, timeout, on_run=on_run)
    extra = {"steps": {**spread(steps), "values": steps}} if len(steps) == len(values) and steps else {}
    record = noise_record(ledger, trainer, harness, trainer.backend, values, seeds, problems, repo_root, "noise",
                          **extra)
    out(format_noise(record, getattr(trainer, "metric_name", "val_bpb")))
    if extra and extra["steps"]["std"] is not None:
        out(f"optimizer steps: mean {extra['steps']['mean']:.1f}, std {extra['steps']['std']:.1f}, "
            f"range {extra['steps']['min']}..{extra['steps']['max']}")
    if problems:
        out(f"{len(problems)} run(s) unusable: " + "; ".join(problems))
    return 0 if record.get("std") is not None else 1
