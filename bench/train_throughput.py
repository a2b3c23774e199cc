"""
Training throughput of train_mlx.py's step against a plain-MLX baseline of the same model,
both measured here, in this process, on the same batches.

    uv run bench/train_throughput.py                      # our step vs the baseline (tuned BLAS on Linux)
    uv run bench/train_throughput.py --depth 4 --dim 256 --T 256 --B 16 --accum 2 --rounds 5
    uv run bench/train_throughput.py --blas               # our step with MLX's bundled BLAS vs the tuned one

Ours: train_mlx.make_train_step (mx.compile over forward, backward and optimizer, Muon + AdamW,
fused soft-capped cross-entropy, mask-free causal / boolean sliding-window attention).
Baseline, how the existing MLX port trains: eager, AdamW for every parameter with per-parameter
Python updates, autodiff through tanh soft-cap + cross-entropy, attention with a dense additive
(T, T) mask. Same GPT, same batch, same dtype. Rounds alternate between the two so machine noise
(2 shared cores here) hits both; the median step time per side is reported.

Prints tokens/s and MFU for each and the ratio ours / baseline. MFU uses upstream's FLOPs-per-token
estimate over the device peak (prepare.peak_flops, else a measured matmul peak on a CPU).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from harness.blas import BLAS_REEXEC_MARKER  # noqa: E402
import train_mlx  # noqa: E402

if __name__ == "__main__":
    train_mlx.use_tuned_blas()  # re-exec with OpenBLAS/MKL preloaded, as train_mlx.py does

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402


def dense_additive_attention(q, k, v, window, scale):
    """The baseline's attention: a dense (T, T) additive mask, 0 where allowed and -inf elsewhere."""
    T = q.shape[2]
    allowed = train_mlx.window_mask(T, T if window is None else window)
    mask = mx.where(allowed, 0.0, -float("inf")).astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def make_baseline_step(model, lr=0.004, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
    """Eager AdamW over every parameter, one Python update per parameter, autodiff loss."""
    def loss_fn(model, x, y):
        logits = model(x)  # the plain path: float32 logits, tanh soft-cap, no fused loss
        return nn.losses.cross_entropy(logits, y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = {name: (mx.zeros_like(p), mx.zeros_like(p)) for name, p in model.flat_parameters().items()}
    t = [0]

    def step(batches, schedule):
        original_attention = train_mlx.attention
        train_mlx.attention = dense_additive_attention
        try:
            acc = None
            for x, y in batches:  # gradient accumulation, evaluated per micro-batch
                loss, grads = loss_and_grad(model, x, y)
                grads = dict(train_mlx.tree_flatten(grads))
                acc = grads if acc is None else {k: acc[k] + g for k, g in grads.items()}
                mx.eval(loss, acc)
        finally:
            train_mlx.attention = original_attention
        t[0] += 1
        grads = {k: g / len(batches) for k, g in acc.items()}
        new = {}
        for name, p in model.flat_parameters().items():
            m, v = state[name]
            g = grads[name]
            m = betas[0] * m + (1 - betas[0]) * g
            v = betas[1] * v + (1 - betas[1]) * g * g
            state[name] = (m, v)
            m_hat, v_hat = m / (1 - betas[0] ** t[0]), v / (1 - betas[1] ** t[0])
            new[name] = p * (1 - lr * weight_decay) - lr * m_hat / (mx.sqrt(v_hat) + eps)
        model.assign(new)
        mx.eval(loss, model.parameters(), state)
        return loss

    return step


def build(args, seed=0):
    mx.random.seed(seed)
    config = train_mlx.GPTConfig(sequence_len=args.T, vocab_size=args.vocab, n_layer=args.depth,
                                 n_head=args.dim // args.head_dim, n_kv_head=args.dim // args.head_dim,
                                 n_embd=args.dim, window_pattern="SSSL")
    dtype = mx.bfloat16 if train_mlx.on_gpu() else mx.float32
    model = train_mlx.GPT(config, dtype=dtype)
    model.init_weights()
    return model, dtype


def time_steps(step, batches, n, sched):
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        loss = step(batches, sched).item()
        times.append(time.perf_counter() - t0)
        if not np.isfinite(loss):
            sys.exit(f"non-finite loss {loss} in the benchmark")
    return times


def run_ours_only(args):
    """Tokens/s of our step alone (for --blas, run in a child process per BLAS)."""
    model, dtype = build(args)
    optimizer = train_mlx.MuonAdamW(model, 0.004, 0.6, 0.04, 0.5, 0.2, (0.8, 0.95), muon_dtype=dtype)
    step = train_mlx.make_train_step(model, optimizer, args.accum)
    batches = random_batches(args)
    sched = mx.array([1.0, 0.9, 0.1])
    time_steps(step, batches, 1, sched)  # compile + warm-up
    dt = statistics.median(time_steps(step, batches, args.steps, sched))
    print(json.dumps({"tokens_per_s": args.B * args.T * args.accum / dt, "step_s": dt,
                      "blas": os.environ.get("LD_PRELOAD", "bundled") or "bundled"}))


def random_batches(args):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(args.accum):
        tokens = rng.integers(0, args.vocab, size=(args.B, args.T + 1))
        out.append((mx.array(tokens[:, :-1].astype(np.int32)), mx.array(tokens[:, 1:].astype(np.int32))))
    return out


def compare_blas(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--ours-only"] + [
        f"--{k}={v}" for k, v in (("depth", args.depth), ("dim", args.dim), ("head-dim", args.head_dim),
                                  ("vocab", args.vocab), ("T", args.T), ("B", args.B), ("accum", args.accum),
                                  ("steps", args.steps))]
    results = {}
    for label, blas in (("bundled", "bundled"), ("tuned", "auto")):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", BLAS_REEXEC_MARKER)}
        env["AUTORESEARCH_BLAS"] = blas
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{label} run failed:\n{out.stdout}\n{out.stderr}")
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label:8s} BLAS: {results[label]['tokens_per_s']:10.0f} tok/s  (step {results[label]['step_s']:.2f} s,"
              f" LD_PRELOAD={results[label]['blas']})", flush=True)
    print(f"ratio tuned / bundled BLAS: {results['tuned']['tokens_per_s'] / results['bundled']['tokens_per_s']:.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step (both sides)")
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per side per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--blas", action="store_true", help="compare MLX's bundled BLAS with the tuned one")
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours_only:
        return run_ours_only(args)
    if args.blas:
        return compare_blas(args)

    device = train_mlx.device_name()
    ours_model, dtype = build(args)
    base_model, _ = build(args)  # same initial weights
    optimizer = train_mlx.MuonAdamW(ours_model, 0.004, 0.6, 0.04, 0.5, 0.2, (0.8, 0.95), muon_dtype=dtype)
    sides = {"ours": train_mlx.make_train_step(ours_model, optimizer, args.accum),
             "baseline": make_baseline_step(base_model)}
    flops_per_token = ours_model.estimate_flops()
    dtype_name = "bf16" if dtype == mx.bfloat16 else "fp32"
    from prepare import peak_flops
    peak = peak_flops(device, dtype_name) or train_mlx.measured_matmul_peak(dtype)
    batches = random_batches(args)
    sched = mx.array([1.0, 0.9, 0.1])
    print(f"device {device} | {dtype_name} | depth {args.depth} dim {args.dim} heads {args.dim // args.head_dim} "
          f"vocab {args.vocab} | B={args.B} T={args.T} accum={args.accum} ({args.B * args.T * args.accum} tokens/step) | "
          f"{flops_per_token / 1e6:.1f} MFLOP/token | peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    for name, step in sides.items():
        time_steps(step, batches, 2, sched)  # compile and warm up outside the timing
    times = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, step in sides.items():
            times[name] += time_steps(step, batches, args.steps, sched)
        print(f"round {r + 1}: " + " | ".join(f"{n} {statistics.median(t) * 1000:.0f} ms/step" for n, t in times.items()),
              flush=True)
    tokens = args.B * args.T * args.accum
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name in sides:
        print(f"{name:9s}: {tps[name]:9.0f} tok/s | MFU {100 * flops_per_token * tps[name] / peak:5.1f}%")
    print(f"ratio ours / baseline: {tps['ours'] / tps['baseline']:.2f}x")


if __name__ == "__main__":
    main()
