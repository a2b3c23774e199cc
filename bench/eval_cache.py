"""What MLX's buffer cache buys evaluate_bpb on a CPU: the same model scored in process with
`eval_kernels.buffer_cache` and without it (MLX's default 32 MB cache), rounds alternating.

    AUTORESEARCH_PROFILE=cpu uv run bench/eval_cache.py [--rounds 3]

The model is train_mlx.py's, untrained, at the active profile's size; batch 16. Prints each
side's times, the ratio of medians (with / without) and that both scored the same val_bpb.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from prepare import use_tuned_blas  # noqa: E402

use_tuned_blas()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    import mlx.core as mx

    import prepare
    import train_mlx
    from harness import eval_kernels

    mx.random.seed(0)
    tokenizer = prepare.Tokenizer.from_directory()
    config = train_mlx.build_model_config(train_mlx.DEPTH, prepare.PROFILE.seq_len, tokenizer.get_vocab_size())
    model = train_mlx.GPT(config, dtype=mx.float32)
    model.init_weights()
    model.compile_forward()
    cached = eval_kernels.buffer_cache
    sides = {"without": lambda *args: contextlib.nullcontext(), "with": cached}
    times, scores = {k: [] for k in sides}, {k: set() for k in sides}
    prepare.evaluate_bpb(model, tokenizer, args.batch_size)   # compile and warm up
    for r in range(args.rounds):
        for side, cache in sides.items():
            eval_kernels.buffer_cache = cache
            t0 = time.perf_counter()
            scores[side].add(prepare.evaluate_bpb(model, tokenizer, args.batch_size))
            times[side].append(time.perf_counter() - t0)
            print(f"round {r + 1} {side:>7} buffer cache: {times[side][-1]:.2f} s", flush=True)
    ratio = statistics.median(times["with"]) / statistics.median(times["without"])
    same = scores["with"] == scores["without"]
    print(f"profile {prepare.PROFILE.name}, {len(prepare.eval_rows(tokenizer))} eval rows, batch {args.batch_size}: "
          f"median {statistics.median(times['without']):.2f} s without, {statistics.median(times['with']):.2f} s with, "
          f"ratio {ratio:.3f}; val_bpb {'identical' if same else 'DIFFERS'}: {sorted(scores['with'])}")


if __name__ == "__main__":
    main()
