"""evaluate_bpb's per-backend work: run the model, and float32 cross-entropy in chunks.

prepare.evaluate_bpb says what is computed; this says how, on each backend, with at most
`chunk_bytes` of float32 logits converted at a time (bounded memory whatever the batch and
vocabulary). Nothing here decides rows, counts or the metric.
"""
import contextlib
import itertools

import numpy as np


@contextlib.contextmanager
def buffer_cache(backend, positions, vocab):
    """Let MLX's CPU allocator keep four batches' worth of freed logits (`positions` x `vocab`
    float32 each) during the eval.

    Why: on a CPU MLX keeps at most 32 MB of freed buffers, so every (B, T, vocab) array of logits
    (128 MiB in the cpu profile) is a fresh allocation whose pages the kernel zeroes on first
    touch: 2.8 ns an element for `x * 2 + 1` on 2^25 elements against 0.35 with the cache (2-core
    box, 2026-12-03). Restored and emptied afterwards, so training's memory is as before."""
    if backend == "mlx":
        import mlx.core as mx
    if backend != "mlx" or mx.default_device() != mx.cpu:   # a GPU's default cache is its memory limit
        yield
        return
    previous = mx.set_cache_limit(0)
    mx.set_cache_limit(max(previous, 4 * positions * vocab * 4))
    try:
        yield
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()


def chunk_positions(chunk_bytes, vocab):
    """Positions per chunk: chunk_bytes of float32 logits."""
    return max(1, chunk_bytes // (4 * vocab))


def batch_nats(model, x, y, real, mask, backend, chunk_bytes, in_numpy=False):
    """Masked sum of the float32 cross-entropy of model(x) against y over the first `real`
    rows. in_numpy: compute it in numpy (MLX on a CPU device)."""
    if backend == "mlx":
        return _mlx_batch_nats(model, x, y, real, mask, chunk_bytes, in_numpy)
    return _torch_batch_nats(model, x, y, real, mask, chunk_bytes)


def logit_chunks(model, x, backend, chunk_bytes):
    """model(x) for the runner's scorer: yields (logits shape, float32 numpy chunk of positions)."""
    if backend == "mlx":
        import mlx.core as mx
        logits = model(mx.array(x))
        flat = logits.reshape(-1, logits.shape[-1])
        step = chunk_positions(chunk_bytes, logits.shape[-1])
        for s in range(0, flat.shape[0], step):
            chunk = flat[s:s + step].astype(mx.float32)
            mx.eval(chunk)
            yield tuple(logits.shape), np.asarray(chunk)
        return
    import torch
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(device))
        flat = logits.reshape(-1, logits.shape[-1])
        step = chunk_positions(chunk_bytes, logits.shape[-1])
        for s in range(0, flat.shape[0], step):
            yield tuple(logits.shape), flat[s:s + step].float().cpu().numpy()


_mlx_chunk_nats = None


def _mlx_batch_nats(model, x, y, real, mask, chunk_bytes, in_numpy):
    import mlx.core as mx
    global _mlx_chunk_nats
    if _mlx_chunk_nats is None:
        def chunk_nats(logits, targets, weights):
            # float32 cross-entropy of one chunk, masked and summed (compiled: the exp fuses)
            logits = logits.astype(mx.float32)
            target_logits = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
            return ((mx.logsumexp(logits, axis=-1) - target_logits) * weights).sum()
        _mlx_chunk_nats = mx.compile(chunk_nats)
    logits = model(mx.array(x))
    V = logits.shape[-1]
    flat = logits[:real].reshape(-1, V)
    targets = mx.array(y[:real].reshape(-1).astype(np.int32))
    weights = mx.array(mask.reshape(-1).astype(np.float32))
    total = 0.0
    step = chunk_positions(chunk_bytes, V)
    if in_numpy:
        # MLX's CPU backend runs exp on one core, ~10x slower than numpy's vectorized exp:
        # on a CPU device, read each float32 chunk without a copy and do the same math in numpy.
        y_flat, w_flat = y[:real].reshape(-1), mask.reshape(-1)
        for s in range(0, flat.shape[0], step):
            chunk = flat[s:s + step].astype(mx.float32)
            mx.eval(chunk)
            total += numpy_chunk_nats(np.asarray(chunk), y_flat[s:s + step], w_flat[s:s + step])
        return total
    for s in range(0, flat.shape[0], step):
        # .item() evaluates this chunk before the next is built: one chunk of float32 at a time
        total += _mlx_chunk_nats(flat[s:s + step], targets[s:s + step], weights[s:s + step]).item()
    return total


def numpy_chunk_nats(logits, targets, mask):
    """Masked sum of float32 cross-entropy over rows of logits (N, V), one temporary of its size."""
    row_max = logits.max(axis=1, keepdims=True)
    shifted = logits - row_max
    target_shifted = shifted[np.arange(len(targets)), targets]
    np.exp(shifted, out=shifted)
    nats = np.log(shifted.sum(axis=1)) - target_shifted
    return float(nats[mask].sum(dtype=np.float64))


def _torch_batch_nats(model, x, y, real, mask, chunk_bytes):
    import torch
    import torch.nn.functional as F
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(device))
        V = logits.shape[-1]
        flat = logits[:real].reshape(-1, V)
        targets = torch.from_numpy(np.ascontiguousarray(y[:real].reshape(-1), dtype=np.int64)).to(device)
        weights = torch.from_numpy(mask.reshape(-1).astype(np.float32)).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        step = chunk_positions(chunk_bytes, V)
        for s in range(0, flat.shape[0], step):
            nats = F.cross_entropy(flat[s:s + step].float(), targets[s:s + step], reduction="none")
            total += (nats * weights[s:s + step]).sum().double()
        return total.item()
