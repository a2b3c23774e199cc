"""What a new training file's first run costs, with and without the start file's kernels.

    uv run bench/kernel_seed.py                   # cpu profile, builtin data

MLX compiles its fused CPU kernels the first time a process needs them; the runner keeps each
training file's compiled kernels for that file's later runs (re-runs, noise runs) and seeds a
new file's first run with the kernels of the run's start file. In a temp checkout of this
project, through the runner's own launch path (sandbox and scorer), this runs the start file
(it compiles), then two different edits of it (a learning-rate change each): one with an empty
kernel cache, one seeded from the start file, then the seeded one again (its own kernels).
Prints each run's seconds and the ratios. Needs `uv run prepare.py --dataset builtin`.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from autoresearch.trainer import Trainer, confine, harness_info, kernel_key, timeout_for  # noqa: E402
from research import checkout  # noqa: E402


def main() -> None:
    os.environ.setdefault("AUTORESEARCH_PROFILE", "cpu")
    os.environ.setdefault("AUTORESEARCH_DATASET", "builtin")
    start = (REPO / "train_mlx.py").read_text()

    def edit(factor: float) -> str:
        return re.sub(r"^MATRIX_LR = ([0-9.e-]+)", lambda m: f"MATRIX_LR = {float(m.group(1)) * factor:g}", start,
                      count=1, flags=re.M)

    with tempfile.TemporaryDirectory() as tmp:
        root = checkout(Path(tmp) / "p", start)
        harness = harness_info(root)
        seconds = {}
        for label, text, seeded in (("start file, cold", start, False),
                                    ("edit A, no seed (cold)", edit(2.0), False),
                                    ("edit B, seeded from the start file", edit(0.5), True),
                                    ("edit B again (its own kernels)", edit(0.5), True)):
            (root / "train_mlx.py").write_text(text)
            trainer = Trainer.for_backend("mlx")
            trainer.kernel_seed = kernel_key(start.encode()) if seeded else None
            confine(trainer, harness)
            outcome = trainer.run(root, root / "run.log", timeout_for(harness["time_budget"]))
            if not outcome.ok:
                sys.exit(f"{label}: the run failed ({outcome.problem})\n{outcome.log_tail}")
            seconds[label] = outcome.seconds
            print(f"{label:<40} {outcome.seconds:6.1f} s  (val_bpb {outcome.value:.4f}, "
                  f"{outcome.summary.get('num_steps')} steps)", flush=True)
        cold, seeded, warm = (seconds["edit A, no seed (cold)"], seconds["edit B, seeded from the start file"],
                              seconds["edit B again (its own kernels)"])
        print(f"first run of a new file: seeded / cold = {seeded / cold:.3f} ({cold - seeded:.1f} s saved); "
              f"seeded / own kernels = {seeded / warm:.3f}")


if __name__ == "__main__":
    main()
