"""A fast stand-in for train_mlx.py in loop tests.

It reads like a real trainer (constants at the top, a summary block at the end) but its
val_bpb is a smooth function of the constants, so a test knows which edits should win.
"""
MATRIX_LR = 0.04
EMBEDDING_LR = 0.6
WARMDOWN_RATIO = 0.5
DEPTH = 4

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare  # noqa: E402


def fake_val_bpb():
    # Minimum 1.0 at MATRIX_LR=0.09, EMBEDDING_LR=0.6, WARMDOWN_RATIO=0.6, DEPTH=5.
    return (1.0 + 0.5 * math.log(MATRIX_LR / 0.09) ** 2 + 0.1 * math.log(EMBEDDING_LR / 0.6) ** 2
            + 0.2 * (WARMDOWN_RATIO - 0.6) ** 2 + 0.01 * abs(DEPTH - 5))


if __name__ == "__main__":
    prepare.ensure_prepared()
    time.sleep(float(os.environ.get("FAKE_TRAIN_SECONDS", "0")))
    if DEPTH > 6:
        raise RuntimeError("out of memory (fake): DEPTH > 6")
    for step in range(20):   # the real trainers' progress line, a loss falling towards val_bpb
        loss = fake_val_bpb() + 3.0 * math.exp(-step / 5)
        print(f"\rstep {step:05d} ({5 * step:.1f}%) | loss: {loss:.6f} | lrm: 1.00 | dt: 50ms | "
              f"tok/sec: 1,234 | mfu: 1.0% | epoch: 1 | remaining: 1s    ", end="", flush=True)
    print()
    fields = prepare.summary_fields()
    print("---")
    print(f"val_bpb:          {fake_val_bpb():.6f}")
    print("training_seconds: 0.1")
    print("total_seconds:    0.2")
    print(f"peak_vram_mb:     {1024.0 * DEPTH:.1f}")
    print("mfu_percent:      1.00")
    print("total_tokens_M:   0.1")
    print("num_steps:        1")
    print("num_params_M:     0.1")
    print(f"depth:            {DEPTH}")
    print("backend:          mlx")
    print("device:           fake")
    print(f"dataset:          {fields['dataset']}")
    print(f"profile:          {fields['profile']}")
    print(f"eval_tokens:      {fields['eval_tokens']}")
