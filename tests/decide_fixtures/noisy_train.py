"""A stand-in trainer whose val_bpb is a smooth function of its constants plus run-to-run
noise, like a real time-budgeted run (different seeds, different step counts).

The noise of run k is N(0, NOISE_SIGMA) drawn from Random(f"{seed}:{k}"), k counted in the
file named by $NOISY_STATE, so a test sees the same sequence every time it runs; or the k-th
number of $NOISY_VALUES (comma-separated) when a test scripts the noise exactly.
"""
MATRIX_LR = 0.04
OFFSET = 0.0

import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare  # noqa: E402

NOISE_SIGMA = float(os.environ.get("NOISY_SIGMA", "0.03"))


def next_run_index() -> int:
    path = os.environ["NOISY_STATE"]
    k = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(k + 1))
    return k


if __name__ == "__main__":
    prepare.ensure_prepared()
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    k = next_run_index()
    if k in [int(i) for i in os.environ.get("NOISY_SLOW_RUNS", "").split(",") if i]:
        import time
        time.sleep(60)       # a run still training when the runner is killed
    scripted = [float(v) for v in os.environ.get("NOISY_VALUES", "").split(",") if v]
    noise = scripted[k] if k < len(scripted) else random.Random(f"{seed}:{k}").gauss(0.0, NOISE_SIGMA)
    val = 1.0 + 0.5 * math.log(MATRIX_LR / 0.09) ** 2 + OFFSET + noise
    fields = prepare.summary_fields()
    print("---")
    print(f"val_bpb:          {val:.6f}")
    print("training_seconds: 0.1")
    print("peak_vram_mb:     1024.0")
    print(f"num_steps:        {1 + k % 3}")
    print("backend:          mlx")
    for key, value in fields.items():
        print(f"{key + ':':<18}{value}")
