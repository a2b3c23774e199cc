"""`attention(q, k, v, *, window, scale)`: causal / sliding-window attention with a fused
Metal forward and backward, wired into MLX autodiff by `mx.custom_function`.

The forward returns O and the row log-sum-exp (float32); the VJP recomputes the
probabilities from the log-sum-exp (no T x T tensor is kept between forward and backward)
and runs the dK/dV and dQ kernels. On a device without Metal, or for a head dim / dtype
without a kernel, the same custom function runs MLX ops with identical semantics (its
forward saves the log-sum-exp the same way and its VJP uses the same formulas), so training
code is the same everywhere.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx

from . import kernels as K

_DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}
# Largest error of a kernel output relative to the output's scale (floor 0.1), by dtype: what
# tests/test_metal_kernels.py allows against float64 attention, and what self_test allows
# against the MLX path (float32 inside, so within rounding of float64 at these tolerances).
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 8e-3}


def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available()) and mx.default_device() == mx.gpu
    except Exception:
        return False


# Head dims where the fused kernels are expected to beat MLX's attention in training, so
# train_mlx.py takes them by default. At 128 the dK/dV kernel keeps K, V, dK and dV fragments
# in registers (D floats per thread, 128 at D=128: past what an Apple GPU thread holds at full
# occupancy), and MLX PR #3241's fused backward ran at 0.67-0.76x of the unfused one there on
# an M3 Max (1.17-1.37x faster at 64). `bench/attention.py` on a Mac measures both.
PREFERRED_HEAD_DIMS = (64,)


def has_kernel(head_dim: int, dtype) -> bool:
    """True if the Metal kernels cover this head dim and dtype."""
    return head_dim in K.HEAD_DIMS and dtype in _DTYPE_NAMES


@lru_cache(maxsize=None)
def _metal_kernel(name: str):
    call = {"fa_fwd": K.forward_call, "fa_bwd_dq": K.dq_call, "fa_bwd_dkdv": K.dkdv_call}[name]((1, 1, 32, 64), "float32")
    return mx.fast.metal_kernel(name=call.name, input_names=call.input_names, output_names=call.output_names,
                                source=call.source, header=call.header)


def _launch(call: K.KernelCall, inputs):
    kern = _metal_kernel(call.name)
    template = [(n, getattr(mx, v) if isinstance(v, str) else v) for n, v in call.template]
    return kern(inputs=inputs, template=template, grid=call.grid, threadgroup=call.threadgroup,
                output_shapes=call.output_shapes, output_dtypes=[getattr(mx, d) for d in call.output_dtypes])


def _scalars(window, scale, T):
    return mx.array(K.effective_window(window, T), dtype=mx.int32), mx.array(scale, dtype=mx.float32)


def _metal_forward(q, k, v, window, scale):
    w, s = _scalars(window, scale, q.shape[2])
    o, lse = _launch(K.forward_call(q.shape, _DTYPE_NAMES[q.dtype]), [q, k, v, w, s])
    return o, lse


def _metal_backward(q, k, v, do, lse, delta, window, scale):
    w, s = _scalars(window, scale, q.shape[2])
    dtype = _DTYPE_NAMES[q.dtype]
    args = [q, k, v, do.astype(q.dtype), lse, delta, w, s]
    (dq,) = _launch(K.dq_call(q.shape, dtype), args)
    dk, dv = _launch(K.dkdv_call(q.shape, dtype), args)
    return dq, dk, dv


def band_mask(T: int, window) -> mx.array:
    """(T, T) bool: query i sees key j iff i - W <= j <= i."""
    W = K.effective_window(window, T)
    i = mx.arange(T)[:, None]
    j = mx.arange(T)[None, :]
    return (j <= i) & (i - j <= W)


def _scores(q, k, window, scale):
    s = (q.astype(mx.float32) * scale) @ k.astype(mx.float32).swapaxes(-1, -2)
    return mx.where(band_mask(q.shape[2], window), s, -math.inf)


def _mlx_forward(q, k, v, window, scale):
    s = _scores(q, k, window, scale)
    lse = mx.logsumexp(s, axis=-1)
    o = mx.exp(s - lse[..., None]) @ v.astype(mx.float32)
    return o.astype(q.dtype), lse


def _mlx_backward(q, k, v, do, lse, delta, window, scale):
    p = mx.exp(_scores(q, k, window, scale) - lse[..., None])
    do = do.astype(mx.float32)
    dv = p.swapaxes(-1, -2) @ do
    dp = do @ v.astype(mx.float32).swapaxes(-1, -2)
    ds = p * (dp - delta[..., None])
    dq = (ds @ k.astype(mx.float32)) * scale
    dk = (ds.swapaxes(-1, -2) @ q.astype(mx.float32)) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@lru_cache(maxsize=None)
def _attention_fn(window, scale: float, use_metal: bool):
    forward = _metal_forward if use_metal else _mlx_forward
    backward = _metal_backward if use_metal else _mlx_backward

    @mx.custom_function
    def attention_with_lse(q, k, v):
        return forward(q, k, v, window, scale)

    @attention_with_lse.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k, v = primals
        do, dlse = cotangents
        o, lse = outputs
        # delta_i = dO_i . O_i; a cotangent on the log-sum-exp enters as -dlse (d lse / d s = P).
        delta = (do.astype(mx.float32) * o.astype(mx.float32)).sum(axis=-1)
        if dlse is not None:
            delta = delta - dlse.astype(mx.float32)
        return backward(q, k, v, do, lse, delta, window, scale)

    return attention_with_lse


def _check(q, k, v, window):
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same (B, H, T, D) shape; got {q.shape}, {k.shape}, {v.shape} "
                         "(repeat k/v heads before calling for grouped-query attention)")
    if q.ndim != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {q.ndim} dims")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    K.effective_window(window, q.shape[2])  # validates


def attention_with_lse(q, k, v, *, window=None, scale=None):
    """(O, log-sum-exp) for q, k, v of shape (B, H, T, D); lse is (B, H, T) float32."""
    _check(q, k, v, window)
    D = q.shape[3]
    scale = float(1.0 / math.sqrt(D) if scale is None else scale)
    use_metal = metal_available() and has_kernel(D, q.dtype)
    window = None if window is None else int(window)
    return _attention_fn(window, scale, use_metal)(q, k, v)


def attention(q, k, v, *, window=None, scale=None):
    """Causal attention; window=W lets query i see keys i-W..i (None: plain causal).

    q, k, v: (B, H, T, D), same dtype (float32, bfloat16 or float16). Returns O (B, H, T, D).
    Differentiable (custom VJP), usable under mx.compile and mx.value_and_grad.
    """
    return attention_with_lse(q, k, v, window=window, scale=scale)[0]


def warmup(head_dims=K.HEAD_DIMS, dtypes=(mx.bfloat16, mx.float16, mx.float32), T: int = 64) -> list:
    """Compiles every template variant (forward, dQ, dK/dV for each head dim and dtype) so a
    timed run does not pay for Metal compilation. Returns the variants run; on a device
    without Metal there is nothing to compile and it returns []."""
    if not metal_available():
        return []
    done = []
    for D in head_dims:
        for dtype in dtypes:
            q = mx.random.normal((1, 1, T, D)).astype(dtype)
            loss = lambda q, k, v: attention(q, k, v).astype(mx.float32).sum()
            val, grads = mx.value_and_grad(loss, argnums=(0, 1, 2))(q, q, q)
            mx.eval(val, grads)
            done.append((D, _DTYPE_NAMES[dtype]))
    return done


def self_test(head_dim: int, dtype, windows=(None,), T: int | None = None) -> str | None:
    """Why the Metal kernels must not be trusted for this model, or None when they may be:
    the forward output and the three gradients of the Metal path, at a small shape per
    window (T = 77 causal, window + 45 windowed, so the band edge is inside the row; or T),
    against the MLX path of the same custom function. Any exception (a compile error in
    Apple's compiler, a launch failure) is a reason too; so is a device without Metal or a
    head dim / dtype without a kernel, since then there is nothing to run."""
    if not metal_available():
        return "no Metal device"
    if not has_kernel(head_dim, dtype):
        return f"no kernel for head dim {head_dim} in {_DTYPE_NAMES.get(dtype, dtype)}"
    name = _DTYPE_NAMES[dtype]
    scale = 1.0 / math.sqrt(head_dim)
    try:
        for window in windows:
            window = None if window is None else int(window)
            rows = T or (77 if window is None else window + 45)
            q, k, v, w = (mx.random.normal((1, 2, rows, head_dim), key=kk).astype(dtype)
                          for kk in mx.random.split(mx.random.key(0), 4))

            def outputs(use_metal):
                fn = _attention_fn(window, scale, use_metal)
                loss = lambda q, k, v: (fn(q, k, v)[0].astype(mx.float32) * w.astype(mx.float32)).sum()
                _, grads = mx.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
                out = [fn(q, k, v)[0], *grads]
                mx.eval(out)
                return out

            for label, got, want in zip(("output", "dQ", "dK", "dV"), outputs(True), outputs(False)):
                got, want = got.astype(mx.float32), want.astype(mx.float32)
                if not mx.isfinite(got).all().item():
                    return f"{label} has non-finite values (head dim {head_dim}, {name}, window {window})"
                err = (mx.abs(got - want).max() / mx.maximum(mx.abs(want).max(), 0.1)).item()
                if err > TOLERANCE[name]:
                    return (f"{label} differs from the MLX path by {err:.1e} > {TOLERANCE[name]:.0e} "
                            f"(head dim {head_dim}, {name}, window {window})")
    except Exception as e:   # noqa: BLE001  any failure of the kernels means: do not use them
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:200]}"
    return None
