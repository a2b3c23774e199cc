"""Evaluation integrity in process: the causality probe of a plain `uv run train_mlx.py`.

The trainer is agent-edited and runs the model; this check runs in the harness, before the
score (prepare.evaluate_bpb calls it). Under the runner the trusted scorer
(harness/scorer.py) probes causality throughout the evaluation instead.
"""
import itertools

import numpy as np

HIDDEN_EVAL_FRACTION = 0.25  # hidden slice: this fraction of eval_tokens, the val rows right after the scored ones
CAUSALITY_RTOL = 1e-4        # allowed change of a logit fingerprint, relative to its scale


def _logits_fingerprint(model, x, backend, probe, step):
    """Run model(x) once; return (logits shape, all finite, (B, T) float64 fingerprint): each
    position's float32 logits projected on a fixed random vector, in the eval's chunks, so
    the probe holds no more memory than scoring does (step: positions at a time)."""
    if backend == "mlx":
        import mlx.core as mx
        logits = model(mx.array(x))
        shape = tuple(logits.shape)
        if len(shape) != 3 or shape[-1] != len(probe):
            return shape, None, None
        p = mx.array(probe.astype(np.float32))
        flat = logits.reshape(-1, shape[-1])
        finite, parts = True, []
        for s in range(0, flat.shape[0], step):
            chunk = flat[s:s + step].astype(mx.float32)
            ok, fp = mx.isfinite(chunk).all(), chunk @ p
            mx.eval(ok, fp)
            finite = finite and bool(ok.item())
            parts.append(np.array(fp, dtype=np.float64))
        return shape, finite, np.concatenate(parts).reshape(shape[:2])
    import torch
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(device))
        shape = tuple(logits.shape)
        if len(shape) != 3 or shape[-1] != len(probe):
            return shape, None, None
        p = torch.from_numpy(probe.astype(np.float32)).to(device)
        flat = logits.reshape(-1, shape[-1])
        finite, parts = True, []
        for s in range(0, flat.shape[0], step):
            chunk = flat[s:s + step].float()
            finite = finite and bool(torch.isfinite(chunk).all().item())
            parts.append((chunk @ p).double().cpu().numpy())
        return shape, finite, np.concatenate(parts).reshape(shape[:2])


def check_causality(model, x, vocab_size, backend, chunk_tokens):
    """Why the model must not be scored, or None. x: (B, T) input tokens.

    Row i is run twice: as given, and with every token from position t_i on replaced
    (t_i spread over 1..T-1 across the rows). Logits at positions before t_i must not move:
    position p may only see tokens 0..p. Also: logits are (B, T, vocab_size) and finite.
    backend: "mlx" or "torch"; chunk_tokens: positions fingerprinted at a time (the eval's chunk)."""
    x = np.asarray(x)
    B, T = x.shape
    rng = np.random.default_rng(20240611)
    probe = rng.standard_normal(vocab_size)
    shape, finite, fp = _logits_fingerprint(model, x, backend, probe, chunk_tokens)
    if shape != (B, T, vocab_size):
        return f"model(x) returned logits of shape {shape}; the harness needs (B, T, vocab) = {(B, T, vocab_size)}"
    if not finite:
        return "model(x) returned non-finite logits (NaN or inf)"
    cuts = 1 + (np.arange(B) * (T - 2)) // max(B - 1, 1) if T > 1 else np.ones(B, dtype=np.int64)
    changed = x.copy()
    for i, t in enumerate(cuts):
        changed[i, t:] = (x[i, t:] + rng.integers(1, vocab_size, T - t)) % vocab_size
    _, _, fp2 = _logits_fingerprint(model, changed, backend, probe, chunk_tokens)
    scale = float(np.abs(fp).max()) + 1.0
    for i, t in enumerate(cuts):
        moved = np.abs(fp[i, :t] - fp2[i, :t])
        if moved.size and moved.max() > CAUSALITY_RTOL * scale:
            p = int(np.argmax(moved > CAUSALITY_RTOL * scale))
            return (f"the logits at position {p} changed when only tokens from position {t} on changed: "
                    f"the model reads future tokens (not causal)")
    return None
