"""The flash-attention Metal kernels, run by the CPU emulator from the exact source strings
handed to mx.fast.metal_kernel, against a float64 reference.

Every case runs twice, under the forward thread/group order and under a shuffled one, with
outputs pre-filled with NaN: an unwritten element stays NaN, and a race changes bits between
the two runs (the emulator is otherwise deterministic, so the two runs must agree exactly).
"""

import time

import mlx.core as mx
import numpy as np
import pytest

from metal_kernels import TOLERANCE
from metal_kernels import kernels as K
from metal_kernels.emulator import EmulatorError, metal_kernel
from metal_kernels.emulator.compiler import find_compiler


def _no_compiler():
    try:
        find_compiler()
    except EmulatorError as e:  # pragma: no cover - CI installs clang
        return str(e)
    return ""


# a mark, not a module-level skip: test_metal_device.py imports the cases and the reference
pytestmark = pytest.mark.skipif(bool(_no_compiler()), reason=_no_compiler() or "clang++ found")

# max |kernel - reference| / max |reference| allowed per dtype (outputs are rounded to it)
TOL = TOLERANCE
SHUFFLED = 7


def reference(q, k, v, do, W, scale):
    """float64 attention forward and backward with the shared window convention."""
    T = q.shape[2]
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    s = np.where((j <= i) & (i - j <= W), q @ np.swapaxes(k, -1, -2) * scale, -np.inf)
    m = s.max(-1, keepdims=True)
    z = np.exp(s - m).sum(-1, keepdims=True)
    p = np.exp(s - m) / z
    o = p @ v
    dp = do @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (do * o).sum(-1, keepdims=True))
    return {"o": o, "lse": (m + np.log(z))[..., 0], "dq": ds @ k * scale,
            "dk": np.swapaxes(ds, -1, -2) @ q * scale, "dv": np.swapaxes(p, -1, -2) @ do}


def emulate(call: K.KernelCall, inputs, schedule):
    kern = metal_kernel(name=call.name, input_names=call.input_names, output_names=call.output_names,
                        source=call.source, header=call.header)
    return kern(inputs=inputs, template=call.template, grid=call.grid, threadgroup=call.threadgroup,
                output_shapes=call.output_shapes, output_dtypes=call.output_dtypes,
                init_value=float("nan"), schedule=schedule)


def run_kernels(q, k, v, do, window, scale, schedule):
    """Forward, then delta = rowsum(dO * O) in float32 (as attention()'s VJP does), then dQ, dK/dV."""
    shape, dtype = q.shape, K.DTYPES[[mx.float32, mx.bfloat16, mx.float16].index(q.dtype)]
    W = np.int32(K.effective_window(window, shape[2]))
    s = np.float32(scale)
    o, lse = emulate(K.forward_call(shape, dtype), [q, k, v, W, s], schedule)
    delta = (np.array(do.astype(mx.float32)) * o.astype(np.float32)).sum(-1, dtype=np.float32)
    (dq,) = emulate(K.dq_call(shape, dtype), [q, k, v, do, lse, delta, W, s], schedule)
    dk, dv = emulate(K.dkdv_call(shape, dtype), [q, k, v, do, lse, delta, W, s], schedule)
    return {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def check_case(B, H, T, D, window, dtype, seed=0):
    rng = np.random.default_rng(seed)
    mxdtype = getattr(mx, dtype)
    tensors = [mx.array(rng.standard_normal((B, H, T, D)).astype(np.float32)).astype(mxdtype) for _ in range(4)]
    exact = [np.array(t.astype(mx.float32)).astype(np.float64) for t in tensors]  # the rounded inputs
    scale = 1.0 / np.sqrt(D)
    ref = reference(*exact, K.effective_window(window, T), scale)
    runs = [run_kernels(*tensors, window, scale, schedule) for schedule in (0, SHUFFLED)]
    for name, want in ref.items():
        first, second = (np.asarray(r[name], dtype=np.float64) for r in runs)
        assert not np.isnan(first).any(), f"{name}: unwritten (NaN) elements"
        np.testing.assert_array_equal(first, second, err_msg=f"{name} differs between thread schedules (race)")
        # relative to the output's scale; the floor covers outputs that are exactly 0 (window 0: dQ)
        err = np.abs(first - want).max() / max(np.abs(want).max(), 0.1)
        tol = TOL[dtype] if name != "lse" else 2e-6 * np.sqrt(D)  # lse is float32 whatever the dtype
        assert err < tol, f"{name}: relative error {err:.2e} > {tol:.1e} (T={T} D={D} window={window} {dtype})"


# Block sizes: forward/dQ key blocks are 32 (D=64) and 16 (D=128); the dK/dV kernel takes 32/16
# keys per group. Windows below, at and above a block; window >= T; ragged T everywhere.
CASES = [
    # (B, H, T, D, window, dtype)
    (1, 2, 77, 64, None, "float32"),
    (2, 1, 77, 64, 5, "float32"),
    (1, 2, 100, 64, 32, "bfloat16"),
    (1, 2, 100, 64, 45, "float16"),
    (1, 1, 50, 64, 60, "float32"),
    (1, 2, 61, 128, 3, "bfloat16"),
    (1, 1, 77, 128, 16, "float32"),
    (2, 1, 90, 128, 40, "float16"),
    (1, 2, 40, 128, None, "float32"),
    (1, 1, 45, 128, 44, "bfloat16"),  # W = T - 1: plain causal
    (1, 1, 33, 64, 0, "float32"),     # W = 0: each query sees only itself
    (1, 1, 1, 64, None, "float32"),   # a single token
    (1, 3, 8, 128, 2, "float32"),     # shorter than one block
]


@pytest.mark.parametrize("B,H,T,D,window,dtype", CASES)
def test_kernels_match_float64_reference(B, H, T, D, window, dtype):
    check_case(B, H, T, D, window, dtype)


def test_forward_and_backward_t256_d64_two_heads_runs_in_seconds():
    t0 = time.perf_counter()
    check_case(1, 2, 256, 64, None, "float32", seed=1)  # includes two full runs and the reference
    print(f"T=256 D=64 H=2 fwd+bwd, two schedules: {time.perf_counter() - t0:.2f} s")


@pytest.mark.slow
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("T,window", [(255, 1), (255, 31), (513, 33), (513, 256), (1000, 500), (1024, None)])
def test_kernels_bigger_sweep(T, window, D, dtype):
    check_case(2, 2, T, D, window, dtype, seed=T)


def test_launch_parameters_respect_metal_limits():
    for D in K.HEAD_DIMS:
        for make in (K.forward_call, K.dq_call, K.dkdv_call):
            call = make((1, 1, 64, D), "bfloat16")
            assert np.prod(call.threadgroup) <= 1024
            assert K.threadgroup_memory_bytes(call) <= 32768
    with pytest.raises(ValueError, match="head dim 96 has no Metal kernel"):
        K.forward_call((1, 1, 64, 96), "float32")
    with pytest.raises(ValueError, match="window must be None or a non-negative int"):
        K.effective_window(-1, 10)
