"""Benchmark: metal_kernels.attention vs mx.fast.scaled_dot_product_attention in training mode.

    uv run python bench/attention.py              # on Apple Silicon: times and peak memory
    uv run python bench/attention.py --B 8 --H 4  # batch and heads (default 8 x 4, bfloat16)

On a Metal device it times forward and forward+backward (value_and_grad of sum(O * dO)) and
measures peak memory for T in {512, 1024, 2048}, head dims 64 and 128, causal and half
window (W = T // 2, the "S" layers), against MLX's own attention in the same process, and
prints ratios (> 1 means the kernels are faster / smaller). Under autodiff MLX runs attention
unfused, keeping the T x T probabilities for the backward.

Elsewhere (no Metal) it cannot time anything meaningful; it prints the work and memory the
kernels skip, computed from the kernels' own loop bounds, and says that timing needs a Mac.
Predicted on a Mac (to be checked there): attention memory per layer linear in T (>= 4x less
than unfused at T=2048) and forward+backward >= 1.3x faster than unfused at head dim 64.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402

import metal_kernels  # noqa: E402
from metal_kernels import kernels as K  # noqa: E402

SEQ_LENS = (512, 1024, 2048)
HEAD_DIMS = (64, 128)


def visited_blocks(T: int, W: int, rows_per_block: int, cols_per_block: int, by_rows: bool) -> int:
    """(row block, column block) pairs a kernel visits, from the same loop bounds as the kernels.
    by_rows: parallel over query blocks (forward, dQ); else over key blocks (dK/dV)."""
    total = 0
    if by_rows:
        for qb in range(-(-T // rows_per_block)):
            q0 = qb * rows_per_block
            q_hi = min(T, q0 + rows_per_block) - 1
            total += q_hi // cols_per_block - max(0, q0 - W) // cols_per_block + 1
    else:
        for kb in range(-(-T // rows_per_block)):
            k0 = kb * rows_per_block
            k_hi = min(T, k0 + rows_per_block) - 1
            total += min(T - 1, k_hi + W) // cols_per_block - k0 // cols_per_block + 1
    return total


def kernel_flops(T: int, D: int, W: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per (batch, head) of the fused kernels, counting the blocks they visit."""
    bk = 32 if D <= 64 else 16
    fwd = visited_blocks(T, W, 32, bk, True) * 2 * (2 * 32 * bk * D)           # S, P@V
    dq = visited_blocks(T, W, 32, bk, True) * 3 * (2 * 32 * bk * D)            # S, dP, dS@K
    bkv, bq = (32, 32) if D <= 64 else (16, 16)
    dkdv = visited_blocks(T, W, bkv, bq, False) * 4 * (2 * bkv * bq * D)       # S^T, dP^T, dV, dK
    return fwd, dq + dkdv


def unfused_flops(T: int, D: int) -> tuple[float, float]:
    """MLX's unfused attention multiplies full T x T matrices: QK^T, PV; then dV, dP, dQ, dK."""
    return 2 * (2 * T * T * D), 4 * (2 * T * T * D)


def needed_pairs(T: int, W: int) -> int:
    return sum(min(i, W) + 1 for i in range(T))


def report_without_metal(B: int, H: int) -> None:
    print(f"No Metal device here ({mx.default_device()}): timing needs a Mac with Apple Silicon.")
    print("Work and memory the fused kernels skip, from their loop bounds "
          f"(B={B}, H={H}, bfloat16 activations, per attention layer):\n")
    hdr = (f"{'T':>5} {'D':>4} {'layer':>11} | {'band/TxT':>8} {'visited/TxT':>11} | {'GFLOP unfused':>13} "
           f"{'GFLOP fused':>11} {'ratio':>6} | {'kept MB unfused':>15} {'kept MB fused':>13} {'ratio':>7}")
    print(hdr)
    print("-" * len(hdr))
    for T in SEQ_LENS:
        for D in HEAD_DIMS:
            for label, W in (("causal", T), ("half window", T // 2)):
                Weff = K.effective_window(W, T)
                uf, ub = unfused_flops(T, D)
                kf, kb = kernel_flops(T, D, Weff)
                bk = 32 if D <= 64 else 16
                visited = visited_blocks(T, Weff, 32, bk, True) * 32 * bk / (T * T)
                band = needed_pairs(T, Weff) / (T * T)
                # unfused keeps scores and probabilities (T x T each, bf16) for the backward;
                # the kernels keep only the row log-sum-exp (float32). O is kept by both.
                kept_unfused = 2 * B * H * T * T * 2 / 1e6
                kept_fused = B * H * T * 4 / 1e6
                print(f"{T:>5} {D:>4} {label:>11} | {band:>8.2f} {visited:>11.2f} | {B * H * (uf + ub) / 1e9:>13.1f} "
                      f"{B * H * (kf + kb) / 1e9:>11.1f} {(uf + ub) / (kf + kb):>5.2f}x | {kept_unfused:>15.1f} "
                      f"{kept_fused:>13.3f} {kept_unfused / kept_fused:>6.0f}x")
    print("\nThe fused backward recomputes the scores (one extra matmul per kernel), which the FLOP "
          "ratio includes. Run this script on a Mac for wall-clock times and measured peak memory.")


def _peak_memory_fns():
    get = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory
    reset = getattr(mx, "reset_peak_memory", None) or mx.metal.reset_peak_memory
    return get, reset


def _time(fn, iters: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def report_on_metal(B: int, H: int, iters: int, dtype) -> None:
    get_peak, reset_peak = _peak_memory_fns()
    print(f"device: {mx.default_device()}, B={B}, H={H}, dtype={dtype}, median of {iters} runs")
    t0 = time.perf_counter()
    metal_kernels.warmup(dtypes=(dtype,))
    print(f"warm-up (compiles every template variant): {time.perf_counter() - t0:.1f} s\n")
    hdr = (f"{'T':>5} {'D':>4} {'layer':>11} | {'fwd ms mlx':>10} {'kernels':>8} {'x':>5} | {'f+b ms mlx':>10} "
           f"{'kernels':>8} {'x':>5} | {'peak MB mlx':>11} {'kernels':>8} {'x':>5} | {'auto takes':>10}")
    print(hdr)
    print("-" * len(hdr))
    for T in SEQ_LENS:
        for D in HEAD_DIMS:
            for label, W in (("causal", None), ("half window", T // 2)):
                mx.random.seed(0)
                q, k, v, do = (mx.random.normal((B, H, T, D)).astype(dtype) for _ in range(4))
                scale = D ** -0.5
                mask = "causal" if W is None else metal_kernels.band_mask(T, W)
                ours = lambda q, k, v: metal_kernels.attention(q, k, v, window=W, scale=scale)
                ref = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
                row = []
                for fn in (ref, ours):
                    loss = lambda q, k, v, fn=fn: (fn(q, k, v) * do).astype(mx.float32).sum()
                    train = mx.value_and_grad(loss, argnums=(0, 1, 2))
                    fwd_ms = _time(lambda: fn(q, k, v), iters)
                    fb_ms = _time(lambda: train(q, k, v), iters)
                    mx.eval(q, k, v, do)
                    reset_peak()
                    base = mx.get_active_memory() if hasattr(mx, "get_active_memory") else 0
                    mx.eval(train(q, k, v))
                    row.append((fwd_ms, fb_ms, (get_peak() - base) / 1e6))
                (rf, rb, rm), (kf, kb, km) = row
                auto = "kernels" if D in metal_kernels.PREFERRED_HEAD_DIMS else "mlx"
                print(f"{T:>5} {D:>4} {label:>11} | {rf:>10.2f} {kf:>8.2f} {rf / kf:>4.2f}x | {rb:>10.2f} "
                      f"{kb:>8.2f} {rb / kb:>4.2f}x | {rm:>11.1f} {km:>8.1f} {rm / km:>4.1f}x | {auto:>10}"
                      + ("" if (rb / kb > 1) == (auto == "kernels") else "  (the other is faster here)"))
    print("\nx = MLX / kernels (> 1: the kernels are faster or use less memory). Targets: f+b >= 1.3x at "
          "D=64; peak memory >= 4x less at T=2048. 'auto takes': what train_mlx.py runs by default "
          f"(the kernels at head dims {metal_kernels.PREFERRED_HEAD_DIMS}, metal_kernels.PREFERRED_HEAD_DIMS).")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=8, help="batch size")
    ap.add_argument("--H", type=int, default=4, help="heads")
    ap.add_argument("--iters", type=int, default=10, help="timed runs per measurement (median)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    if metal_kernels.metal_available():
        report_on_metal(args.B, args.H, args.iters, getattr(mx, args.dtype))
    else:
        report_without_metal(args.B, args.H)


if __name__ == "__main__":
    main()
