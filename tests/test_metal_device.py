"""On a Mac: the real Metal kernels (compiled by Apple's MSL compiler, run on the GPU) through
attention()'s custom VJP, against the float64 reference. Skipped where there is no Metal
device; there the emulator tests (test_metal_kernels.py) run the same source strings on CPU."""

import mlx.core as mx
import numpy as np
import pytest

import metal_kernels
from metal_kernels import kernels as K

from test_metal_kernels import CASES, TOL, reference

pytestmark = pytest.mark.skipif(not metal_kernels.metal_available(), reason="needs a Metal device (Apple Silicon)")

BIG = [(2, 4, T, D, W, dtype) for T in (512, 1031) for D in (64, 128) for W in (None, T // 2, 100)
       for dtype in ("bfloat16", "float32")]


def check_on_device(B, H, T, D, window, dtype, seed=0):
    rng = np.random.default_rng(seed)
    mxdtype = getattr(mx, dtype)
    q, k, v, do = (mx.array(rng.standard_normal((B, H, T, D)).astype(np.float32)).astype(mxdtype) for _ in range(4))
    scale = 1.0 / np.sqrt(D)
    o, lse = metal_kernels.attention_with_lse(q, k, v, window=window, scale=scale)
    loss = lambda q, k, v: (metal_kernels.attention(q, k, v, window=window, scale=scale) * do).astype(mx.float32).sum()
    dq, dk, dv = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    got = {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    exact = [np.array(t.astype(mx.float32)).astype(np.float64) for t in (q, k, v, do)]
    for name, want in reference(*exact, K.effective_window(window, T), scale).items():
        g = np.array(got[name].astype(mx.float32)).astype(np.float64)
        assert not np.isnan(g).any(), f"{name}: NaN"
        err = np.abs(g - want).max() / max(np.abs(want).max(), 0.1)
        tol = TOL[dtype] if name != "lse" else 2e-6 * np.sqrt(D)
        assert err < tol, f"{name}: relative error {err:.2e} > {tol:.1e} (T={T} D={D} window={window} {dtype})"


@pytest.mark.parametrize("B,H,T,D,window,dtype", CASES)
def test_metal_kernels_on_device(B, H, T, D, window, dtype):
    check_on_device(B, H, T, D, window, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("B,H,T,D,window,dtype", BIG)
def test_metal_kernels_on_device_bigger(B, H, T, D, window, dtype):
    check_on_device(B, H, T, D, window, dtype, seed=T)
