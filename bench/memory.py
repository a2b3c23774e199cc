"""Benchmark: peak memory and tokens/s of train_mlx.py's training step, now against a baseline
version of the file, in the same run on the same data.

    uv run bench/memory.py                        # standard profile: micro-batch 16 x 2048, compute dtype
    uv run bench/memory.py --baseline ac3e69e     # the training file at a git revision (default: before the chunked loss)
    uv run bench/memory.py --profile cpu --steps 20 --loss-streams 1   # the loss on one CPU stream

Each version runs in its own process (a fresh allocator and peak counter): its model, optimizer
and compiled step from the file itself at the profile's settings, a warm-up step (compile),
then --steps timed micro-steps on the builtin training data; the peak is mx.get_peak_memory()
over the timed steps. Prints both, and the ratios (now / baseline). The changes measured here:
the chunked, fused LM head + cross-entropy (O(chunk x vocab) memory where autodiff held a dozen
(tokens x vocab) tensors), blocked CPU attention and the fused MLP (activations autodiff kept).
Needs `uv run prepare.py --dataset builtin`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BASELINE = "ac3e69e"  # the last commit whose train_mlx.py took autodiff-free but unchunked logits


def measure_one(path: Path, steps: int, loss_streams: int | None) -> dict:
    """One training file's step: peak bytes and tokens/s (run in a child process)."""
    import mlx.core as mx

    spec = importlib.util.spec_from_file_location("trainer_under_test", path)
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    if loss_streams and hasattr(t, "_LOSS_STREAMS"):  # the chunked loss's CPU streams, by hand
        t._LOSS_STREAMS[:] = [mx.new_stream(mx.default_device()) for _ in range(loss_streams)]
    import prepare
    prepare.ensure_prepared()
    tokenizer = prepare.Tokenizer.from_directory()
    seq_len = prepare.PROFILE.seq_len
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    mx.random.seed(0)
    model = t.GPT(t.build_model_config(t.DEPTH, seq_len, tokenizer.get_vocab_size()), dtype=dtype)
    model.init_weights()
    optimizer = t.MuonAdamW(model, unembedding_lr=t.UNEMBEDDING_LR, embedding_lr=t.EMBEDDING_LR,
                            matrix_lr=t.MATRIX_LR, scalar_lr=t.SCALAR_LR, weight_decay=t.WEIGHT_DECAY,
                            adam_betas=t.ADAM_BETAS, muon_dtype=dtype)
    step = t.make_train_step(model, optimizer, 1)
    loader = prepare.make_dataloader(tokenizer, t.DEVICE_BATCH_SIZE, seq_len, "train", backend="mlx")
    schedule = mx.array([1.0, 0.85, t.WEIGHT_DECAY], dtype=mx.float32)
    x, y, _ = next(loader)
    t0 = time.perf_counter()
    step([(x, y)], schedule)
    warm = time.perf_counter() - t0
    mx.clear_cache()
    mx.reset_peak_memory()
    seconds = []
    for _ in range(steps):
        x, y, _ = next(loader)
        t0 = time.perf_counter()
        step([(x, y)], schedule)
        seconds.append(time.perf_counter() - t0)
    tokens = t.DEVICE_BATCH_SIZE * seq_len
    return {"peak_gib": mx.get_peak_memory() / 2 ** 30, "tokens_per_s": tokens * steps / sum(seconds),
            "step_seconds": seconds, "warmup_seconds": round(warm, 1), "micro_batch": [t.DEVICE_BATCH_SIZE, seq_len],
            "dtype": str(dtype), "device": str(mx.default_device())}


def run_child(path: Path, steps: int, env: dict, loss_streams: int | None = None) -> dict:
    extra = ["--loss-streams", str(loss_streams)] if loss_streams else []
    out = subprocess.run([sys.executable, __file__, "--one", str(path), "--steps", str(steps), *extra], cwd=REPO,
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{path.name}: the step failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=BASELINE, help="git revision of the baseline train_mlx.py")
    p.add_argument("--profile", default="standard")
    p.add_argument("--steps", type=int, default=2, help="timed micro-steps per version")
    p.add_argument("--loss-streams", type=int, help="streams for the chunked loss of the current file "
                                                      "(default: the file's own choice, one per core on a CPU)")
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.steps, args.loss_streams)))
        return 0
    from prepare import use_tuned_blas
    use_tuned_blas()  # Linux CPUs: OpenBLAS over MLX's bundled BLAS, as the trainer runs
    env = {**os.environ, "AUTORESEARCH_PROFILE": args.profile}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "train_mlx_baseline.py"
        shown = subprocess.run(["git", "show", f"{args.baseline}:train_mlx.py"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode != 0:
            raise SystemExit(f"git show {args.baseline}:train_mlx.py failed: {shown.stderr.strip()}")
        old.write_text(shown.stdout)
        results = {}
        for name, path in (("baseline", old), ("now", REPO / "train_mlx.py")):
            print(f"{name}: {path.name} ({args.profile} profile, {args.steps} timed micro-steps) ...", flush=True)
            results[name] = r = run_child(path, args.steps, env, args.loss_streams if name == "now" else None)
            print(f"  peak {r['peak_gib']:.2f} GiB, {r['tokens_per_s']:,.0f} tokens/s "
                  f"(micro-batch {r['micro_batch'][0]} x {r['micro_batch'][1]}, {r['dtype']}, {r['device']}; "
                  f"steps {', '.join(f'{s:.1f}' for s in r['step_seconds'])} s)", flush=True)
    b, n = results["baseline"], results["now"]
    print(f"\nnow / baseline: peak memory {n['peak_gib'] / b['peak_gib']:.3f}x, "
          f"tokens/s {n['tokens_per_s'] / b['tokens_per_s']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
