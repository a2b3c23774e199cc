"""metal_kernels.attention: the custom function and its VJP against autodiff of naive attention.

On this CPU the fallback path runs (MLX ops). The Metal path's Python wiring (argument order,
delta, the log-sum-exp cotangent, output dtypes) is exercised by routing its kernel launches
through the CPU emulator, so the same KernelCalls that go to mx.fast.metal_kernel on a Mac run.
"""

import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import metal_kernels
from metal_kernels import attention, attention_with_lse
from metal_kernels import attention as attention_module_fn  # noqa: F401  (the public name)

attn_mod = sys.modules["metal_kernels.attention"]


def naive(q, k, v, window, scale=None):
    T, D = q.shape[2], q.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    i, j = mx.arange(T)[:, None], mx.arange(T)[None, :]
    ok = (j <= i) & (i - j <= (T if window is None else window))
    s = mx.where(ok, (q.astype(mx.float32) * scale) @ k.astype(mx.float32).swapaxes(-1, -2), -1e30)
    return s, mx.softmax(s, axis=-1) @ v.astype(mx.float32)


def grads_of(fn, q, k, v, w):
    loss = lambda q, k, v: (fn(q, k, v).astype(mx.float32) * w).sum()
    return mx.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def inputs(shape, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    return [mx.random.normal(shape).astype(dtype) for _ in range(4)]


@pytest.mark.parametrize("window", [None, 0, 5, 16, 100])
def test_vjp_under_compile_matches_autodiff_of_naive_attention(window):
    q, k, v, w = inputs((2, 3, 37, 64))
    ours = mx.compile(lambda q, k, v: grads_of(lambda a, b, c: attention(a, b, c, window=window), q, k, v, w))(q, k, v)
    ref = grads_of(lambda a, b, c: naive(a, b, c, window)[1], q, k, v, w)
    assert abs(ours[0].item() - ref[0].item()) < 1e-3
    for g, r in zip(ours[1], ref[1]):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=2e-5, rtol=1e-4)


def test_log_sum_exp_output_and_its_gradient():
    q, k, v, w = inputs((1, 2, 29, 64), seed=1)
    o, lse = attention_with_lse(q, k, v, window=7, scale=0.3)
    s, o_ref = naive(q, k, v, 7, scale=0.3)
    np.testing.assert_allclose(np.array(o), np.array(o_ref), atol=1e-5)
    np.testing.assert_allclose(np.array(lse), np.array(mx.logsumexp(s, axis=-1)), atol=1e-5)
    assert lse.dtype == mx.float32
    # a loss that uses the log-sum-exp too: its cotangent enters the VJP through delta
    f_ours = lambda q, k, v: sum((t * w[..., : t.shape[-1]]).sum() for t in [attention_with_lse(q, k, v, window=7, scale=0.3)[1][..., None], attention(q, k, v, window=7, scale=0.3)])
    f_ref = lambda q, k, v: sum((t * w[..., : t.shape[-1]]).sum() for t in [mx.logsumexp(naive(q, k, v, 7, 0.3)[0], axis=-1)[..., None], naive(q, k, v, 7, 0.3)[1]])
    g_ours = mx.grad(f_ours, argnums=(0, 1, 2))(q, k, v)
    g_ref = mx.grad(f_ref, argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=3e-5, rtol=1e-4)


def test_bfloat16_inputs_keep_their_dtype():
    q, k, v, w = inputs((1, 2, 20, 128), dtype=mx.bfloat16)
    o = attention(q, k, v, window=4)
    assert o.dtype == mx.bfloat16
    _, grads = grads_of(lambda a, b, c: attention(a, b, c, window=4), q, k, v, w)
    assert all(g.dtype == mx.bfloat16 for g in grads)
    ref = naive(q, k, v, 4)[1]
    np.testing.assert_allclose(np.array(o.astype(mx.float32)), np.array(ref), atol=3e-2)


def test_training_steps_through_attention_reduce_the_loss():
    # a one-layer attention "model" trained by SGD through the custom VJP
    mx.random.seed(3)
    x = mx.random.normal((2, 24, 32))
    target = mx.random.normal((2, 24, 32))
    params = {"wq": mx.random.normal((32, 64)) * 0.1, "wk": mx.random.normal((32, 64)) * 0.1,
              "wv": mx.random.normal((32, 64)) * 0.1, "wo": mx.random.normal((64, 32)) * 0.1}

    def loss_fn(p):
        q, k, v = ((x @ p[n])[:, None] for n in ("wq", "wk", "wv"))
        y = attention(q, k, v, window=6)[:, 0] @ p["wo"]
        return ((y - target) ** 2).mean()

    step = mx.compile(mx.value_and_grad(loss_fn))
    losses = []
    for _ in range(30):
        loss, g = step(params)
        params = {n: params[n] - 0.5 * g[n] for n in params}
        mx.eval(params)
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]


def test_bad_inputs_name_the_problem():
    q = mx.zeros((1, 2, 8, 64))
    with pytest.raises(ValueError, match="same .B, H, T, D. shape"):
        attention(q, q[:, :1], q)
    with pytest.raises(ValueError, match="window must be None or a non-negative int"):
        attention(q, q, q, window=-3)
    with pytest.raises(ValueError, match="must be .B, H, T, D."):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, q.astype(mx.bfloat16), q)


def test_warmup_has_nothing_to_compile_without_metal():
    if metal_kernels.metal_available():
        pytest.skip("Metal device: warmup compiles for real (see bench/attention.py)")
    assert metal_kernels.warmup() == []


def test_package_imports_only_mlx_and_itself():
    code = ("import sys, metal_kernels; bad = [m for m in ('prepare', 'train_mlx', 'train', 'torch', "
            "'metal_kernels.emulator') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------- the Metal path, emulated

@pytest.mark.parametrize("window,D", [(None, 64), (9, 128)])
def test_metal_path_wiring_matches_naive_attention(emulated_metal, window, D):
    q, k, v, w = inputs((1, 2, 45, D), seed=4)
    val, grads = grads_of(lambda a, b, c: attention(a, b, c, window=window), q, k, v, w)
    mx.eval(val, grads)
    assert emulated_metal == ["fa_fwd", "fa_bwd_dq", "fa_bwd_dkdv"]
    ref_val, ref_grads = grads_of(lambda a, b, c: naive(a, b, c, window)[1], q, k, v, w)
    assert abs(val.item() - ref_val.item()) < 1e-3
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------- the self-test before training

def test_self_test_passes_kernels_that_agree(emulated_metal):
    assert metal_kernels.self_test(64, mx.float32, windows=(None, 9), T=45) is None
    assert emulated_metal[:3] == ["fa_fwd", "fa_bwd_dq", "fa_bwd_dkdv"]


def test_self_test_fails_kernels_that_return_wrong_values(emulated_metal, monkeypatch):
    emulated = attn_mod._launch

    def off_by_a_bit(call, args):     # a kernel whose dK comes out 5% large
        outs = emulated(call, args)
        return [outs[0] * 1.05, *outs[1:]] if call.name == "fa_bwd_dkdv" else outs
    monkeypatch.setattr(attn_mod, "_launch", off_by_a_bit)
    reason = metal_kernels.self_test(64, mx.float32, windows=(None,), T=45)
    assert reason.startswith("dK differs from the MLX path by 5.") and "head dim 64, float32" in reason


def test_self_test_fails_kernels_that_do_not_compile(monkeypatch):
    def compile_error(call, args):
        raise RuntimeError("[metal::Device] Unable to build metal library from source\n"
                           "program_source:12:5: error: use of undeclared identifier 'simd_sum2'")
    monkeypatch.setattr(attn_mod, "_launch", compile_error)
    monkeypatch.setattr(attn_mod, "metal_available", lambda: True)
    reason = metal_kernels.self_test(128, mx.bfloat16)
    assert reason == "RuntimeError: [metal::Device] Unable to build metal library from source"


def test_self_test_without_metal_or_kernel_says_why(monkeypatch):
    if not metal_kernels.metal_available():
        assert metal_kernels.self_test(64, mx.float32) == "no Metal device"
    monkeypatch.setattr(attn_mod, "metal_available", lambda: True)
    assert metal_kernels.self_test(80, mx.bfloat16) == "no kernel for head dim 80 in bfloat16"
