"""train_mlx.py: the smoke-profile run end to end, and the model/optimizer/step pieces it is built from."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from harness import blas  # noqa: E402
import train_mlx  # noqa: E402

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "backend", "device", "dataset", "profile", "eval_tokens",
                "unigram_bpb"]

TINY = dict(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL")


def tiny_model(seed=0, **overrides):
    mx.random.seed(seed)
    model = train_mlx.GPT(train_mlx.GPTConfig(**{**TINY, **overrides}))
    model.init_weights()
    return model


def tiny_optimizer(model, weight_decay=0.2):
    return train_mlx.MuonAdamW(model, unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, scalar_lr=0.5,
                               weight_decay=weight_decay, adam_betas=(0.8, 0.95))


def random_batch(seed, B=4, T=32, V=128):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(B, T + 1))
    return mx.array(tokens[:, :-1].astype(np.int32)), mx.array(tokens[:, 1:].astype(np.int32))


def schedule(lr_mult=1.0, momentum=0.85, weight_decay=0.2):
    return mx.array([lr_mult, momentum, weight_decay], dtype=mx.float32)

# ---------------------------------------------------------------------------
# The real script, smoke profile, builtin data
# ---------------------------------------------------------------------------


def parse_summary(stdout):
    block = stdout[stdout.rindex("\n---\n") + 5:]
    return [tuple(part.strip() for part in line.split(":", 1)) for line in block.strip().splitlines()]


def uniform_bpb(env):
    """val_bpb of a model that spreads its probability evenly over the vocabulary, on the same eval rows."""
    code = ("import numpy as np, prepare as p; tok = p.Tokenizer.from_directory(); y = p.eval_rows(tok)[:, 1:]; "
            "b = p.get_token_bytes()[y]; print(np.log2(tok.get_vocab_size()) * (b > 0).sum() / b.sum())")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


def unigram_bpb(env):
    code = "import prepare as p; print(p.unigram_bpb(p.Tokenizer.from_directory()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


def test_smoke_run_prints_full_summary(builtin_cache):
    env = {**os.environ, **builtin_cache}
    env.pop("AUTORESEARCH_BLAS", None)
    run = subprocess.run([sys.executable, "train_mlx.py"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = parse_summary(run.stdout)
    assert [key for key, _ in summary] == SUMMARY_KEYS
    values = dict(summary)
    val_bpb = float(values["val_bpb"])
    assert math.isfinite(val_bpb) and val_bpb < uniform_bpb(env), values
    assert int(values["num_steps"]) >= 2
    assert float(values["training_seconds"]) >= 15  # the smoke profile's budget
    assert float(values["peak_vram_mb"]) > 0 and 0 < float(values["mfu_percent"]) <= 100
    assert values["backend"] == "mlx" and values["device"].endswith(("(cpu)", "(gpu)"))
    assert values["dataset"] == "builtin" and values["profile"] == "smoke"
    # the floor of the same rows, as prepare computes it; the smoke model (15 s) learns nothing more
    assert float(values["unigram_bpb"]) == pytest.approx(unigram_bpb(env), abs=1e-6)
    assert int(values["eval_tokens"]) > 0
    if sys.platform == "linux" and blas.bundled_reference_blas() and blas.find_tuned_blas():
        assert "blas: preloaded" in run.stdout  # said once, before anything else
        assert run.stdout.count("blas: preloaded") == 1

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def test_parameter_names_follow_upstream():
    names = set(train_mlx.GPT(train_mlx.GPTConfig(**TINY)).flat_parameters())
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_q.weight", "transformer.h.1.attn.ve_gate.weight",
            "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "lm_head.weight",
            "resid_lambdas", "x0_lambdas", "value_embeds.1.weight"} <= names
    assert "transformer.h.0.attn.ve_gate.weight" not in names and "value_embeds.0.weight" not in names


def test_sliding_window_convention():
    # query i sees key j iff i - W <= j <= i
    mask = np.array(train_mlx.window_mask(5, 2))
    expected = np.array([[i - 2 <= j <= i for j in range(5)] for i in range(5)])
    np.testing.assert_array_equal(mask, expected)
    assert train_mlx.GPT(train_mlx.GPTConfig(**{**TINY, "n_layer": 5})).window_sizes == [16, 16, 16, 32, 32]
    # the windowed attention equals a dense softmax with that mask
    q, k, v = (mx.random.normal((1, 2, 8, 16)) for _ in range(3))
    got = np.array(train_mlx.attention(q, k, v, window=3, scale=0.25))
    scores = np.einsum("bhid,bhjd->bhij", np.array(q), np.array(k)) * 0.25
    scores = np.where(np.array(train_mlx.window_mask(8, 3)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = np.einsum("bhij,bhjd->bhid", p / p.sum(-1, keepdims=True), np.array(v))
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("window", [None, 5, 12])
def test_blocked_cpu_attention_matches_dense_attention_and_its_autodiff(monkeypatch, compiled, window):
    """Output and the gradients of q, k and v equal autodiff of MLX's dense masked attention,
    over several blocks with a ragged last one, causal and sliding-window (a window shorter
    than a block, and one reaching back over a block)."""
    monkeypatch.setattr(train_mlx, "ATTN_BLOCK", 8)
    q, k, v, do = (mx.random.normal((2, 3, 21, 16), key=mx.random.key(i)) for i in range(4))
    mask = "causal" if window is None else train_mlx.window_mask(21, window)

    def dense(q, k, v):
        return (mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask) * do).sum()

    def blocked(q, k, v):
        return (train_mlx.attention(q, k, v, window, scale=0.25) * do).sum()

    grad_of = lambda f: mx.value_and_grad(f, argnums=(0, 1, 2))
    ref, ref_grads = grad_of(dense)(q, k, v)
    got, grads = (mx.compile(grad_of(blocked)) if compiled else grad_of(blocked))(q, k, v)
    assert abs(ref.item() - got.item()) < 1e-3
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=2e-5)
    assert [b[2] for b in train_mlx.attention_blocks(21, 5)] == [0, 3, 11]    # keys a block never sees are skipped


@pytest.mark.parametrize("compiled", [False, True])
def test_blocked_attention_runs_its_blocks_one_after_another(monkeypatch, compiled):
    """Forward and backward take the blocks in turn: the step's peak stays well below the score
    matrices of all blocks together, which MLX would otherwise compute at once (measured: 73 MB
    eager and 108 MB compiled without the waits, against 71 MB for all blocks' scores)."""
    monkeypatch.setattr(train_mlx, "ATTN_BLOCK", 128)
    B, H, T, D = 1, 4, 2048, 16
    q, k, v, do = (mx.random.normal((B, H, T, D), key=mx.random.key(i)) for i in range(4))
    mx.eval(q, k, v, do)
    grads = mx.grad(lambda q, k, v: (train_mlx.attention(q, k, v, None, scale=0.25) * do).sum(), argnums=(0, 1, 2))
    grads = mx.compile(grads) if compiled else grads
    mx.eval(grads(q, k, v))  # warm-up
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(grads(q, k, v))
    used = mx.get_peak_memory() - base
    keys = sum(hi - k0 for _, hi, k0 in train_mlx.attention_blocks(T, T - 1))
    all_blocks = 2 * B * H * 128 * keys * 4  # float32 scores and their gradients, every block
    assert used < 0.75 * all_blocks, (used, all_blocks)


@pytest.mark.parametrize("softcap", [15, 0])
@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_lm_head_loss_matches_autodiff(monkeypatch, compiled, softcap):
    """Loss and both gradients equal autodiff of the plain formula (LM head, soft-cap or none,
    ignored targets), with rows split over several chunks per stream and a ragged last chunk."""
    monkeypatch.setattr(train_mlx, "LOSS_CHUNK", 8)
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(37, 16)).astype(np.float32))
    w = mx.array(rng.normal(size=(50, 16)).astype(np.float32)) * 3  # logits far past the soft-cap
    targets = rng.integers(0, 50, size=37).astype(np.int32)
    targets[::5] = -1  # ignored
    targets = mx.array(targets)

    def reference(x, w):
        c = softcap * mx.tanh((x @ w.T) / softcap) if softcap else x @ w.T
        valid = targets >= 0
        safe = mx.where(valid, targets, 0)
        nats = mx.logsumexp(c, axis=-1) - mx.take_along_axis(c, safe[:, None], axis=-1)[:, 0]
        return (nats * valid).sum() / valid.sum()

    def chunked(x, w):
        valid = (targets >= 0).astype(mx.float32)
        return train_mlx.lm_head_loss(x, w, mx.where(targets >= 0, targets, 0), valid, softcap)[0] / valid.sum()

    grad_of = lambda f: mx.value_and_grad(f, argnums=(0, 1))
    ref_loss, (ref_dx, ref_dw) = grad_of(reference)(x, w)
    loss, (dx, dw) = (mx.compile(grad_of(chunked)) if compiled else grad_of(chunked))(x, w)
    assert abs(ref_loss.item() - loss.item()) < 1e-5
    np.testing.assert_allclose(np.array(dx), np.array(ref_dx), atol=1e-6)
    np.testing.assert_allclose(np.array(dw), np.array(ref_dw), atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_fast_exp_and_tanh_match_the_library(compiled):
    """The CPU loss's multiply-add exp: within 2e-5 relative of exp on [-32, 32] (the loss needs
    [-30, 0] and tanh's [-32, 32]), clamped, never inf or negative, past it; its tanh within 4e-6
    everywhere, exactly +-1 far out."""
    x = np.linspace(-32, 32, 200_001).astype(np.float32)
    fast_exp = mx.compile(train_mlx.fast_exp) if compiled else train_mlx.fast_exp
    got = np.array(fast_exp(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-5
    far = np.array(fast_exp(mx.array([-1e4, -100.0, 100.0, 1e4], dtype=mx.float32)))
    assert np.all(np.isfinite(far)) and np.all(far > 0) and far[0] < 2e-14 and far[-1] > 7e13
    z = np.concatenate([np.linspace(-20, 20, 100_001), [-1e6, 1e6]]).astype(np.float32)
    t = np.array(train_mlx.tanh(mx.array(z))).astype(np.float64)   # the fast_exp form on a CPU
    assert np.max(np.abs(t - np.tanh(z.astype(np.float64)))) < 4e-6
    assert t[-2] == -1.0 and t[-1] == 1.0


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_relu2_mlp_matches_autodiff(compiled, dtype):
    """Output and the gradients of the input and both weights equal autodiff of the plain
    relu(x W1^T)^2 W2^T, with about half the hidden units below zero (float32 weights, the
    compute dtype's activations, as the model calls it)."""
    rng = np.random.default_rng(1)
    x = mx.array(rng.normal(size=(3, 7, 16)).astype(np.float32)).astype(dtype)
    w_fc, w_proj = (mx.array(rng.normal(size=s).astype(np.float32)) * 0.3 for s in ((64, 16), (16, 64)))
    dy = mx.array(rng.normal(size=(3, 7, 16)).astype(np.float32)).astype(dtype)

    def plain(x, w_fc, w_proj):
        h = nn_relu(x @ w_fc.astype(dtype).T)
        return ((h * h) @ w_proj.astype(dtype).T * dy).astype(mx.float32).sum()

    def fused(x, w_fc, w_proj):
        return (train_mlx.relu2_mlp(x, w_fc, w_proj)[0] * dy).astype(mx.float32).sum()

    grad_of = lambda f: mx.value_and_grad(f, argnums=(0, 1, 2))
    ref, ref_grads = grad_of(plain)(x, w_fc, w_proj)
    got, grads = (mx.compile(grad_of(fused)) if compiled else grad_of(fused))(x, w_fc, w_proj)
    tol = 1e-5 if dtype == mx.float32 else 3e-2
    assert abs(ref.item() - got.item()) <= tol * max(1, abs(ref.item()))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        scale = float(mx.abs(r.astype(mx.float32)).max())
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(r.astype(mx.float32)), atol=tol * scale)


def nn_relu(x):
    return mx.maximum(x, 0)


@pytest.mark.parametrize("softcap", [15, 0])
def test_model_loss_is_the_cross_entropy_of_its_logits(monkeypatch, softcap):
    monkeypatch.setattr(train_mlx, "LOSS_CHUNK", 16)
    monkeypatch.setattr(train_mlx, "LOGIT_SOFTCAP", softcap)
    model = tiny_model()
    model.lm_head.weight = mx.random.normal(model.lm_head.weight.shape)  # logits past the soft-cap
    V = TINY["vocab_size"]
    idx = mx.random.randint(0, V, (2, 32))
    targets = mx.where(mx.arange(32) % 7 == 0, -1, mx.roll(idx, -1, axis=1))
    logits = model(idx).reshape(-1, V)
    assert (mx.abs(logits).max().item() <= 15) == (softcap == 15)
    flat = targets.reshape(-1)
    valid = flat >= 0
    nats = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, mx.where(valid, flat, 0)[:, None], axis=-1)[:, 0]
    assert abs(model(idx, targets).item() - ((nats * valid).sum() / valid.sum()).item()) < 1e-5

# ---------------------------------------------------------------------------
# Optimizer and step
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 32, 96)])
def test_polar_express_orthogonalises(shape):
    g = mx.random.normal(shape)
    before = np.linalg.svd(np.array(g), compute_uv=False)
    after = np.linalg.svd(np.array(train_mlx.orthogonalize(g)), compute_uv=False)
    assert before.max() / before.min() > 1.5  # the input is far from orthogonal
    assert 0.7 < after.min() and after.max() < 1.2, (after.min(), after.max())


def test_one_muon_step_is_an_orthogonal_update():
    model = tiny_model()
    optimizer = tiny_optimizer(model, weight_decay=0.0)
    name = "transformer.h.0.mlp.c_fc.weight"  # (256, 64): Muon, tall
    before = model.flat_parameters()
    grads = {n: mx.random.normal(p.shape) for n, p in before.items()}
    optimizer.apply_gradients(model, grads, schedule(momentum=0.0, weight_decay=0.0))
    update = np.array(before[name] - model.flat_parameters()[name]) / (0.04 * (256 / 64) ** 0.5)
    singular = np.linalg.svd(update, compute_uv=False)
    assert 0.6 < singular.min() and singular.max() < 1.4, (singular.min(), singular.max())
    # AdamW params moved too (first Adam step: lr * sign(grad))
    lm_lr = 0.004 * (64 / 768) ** -0.5
    step = np.array(before["lm_head.weight"] - model.flat_parameters()["lm_head.weight"])
    np.testing.assert_allclose(np.abs(step), lm_lr, rtol=1e-3)


def test_compiled_step_equals_eager_step():
    batches = [random_batch(1), random_batch(2)]
    results = []
    for compile in (False, True):
        model = tiny_model(seed=3)
        step = train_mlx.make_train_step(model, tiny_optimizer(model), grad_accum_steps=2, compile=compile)
        losses = [step(batches, schedule(lr_mult=1.0 - 0.1 * i, momentum=0.85 + 0.01 * i)).item() for i in range(3)]
        results.append((losses, model.flat_parameters()))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = results
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5)
    for name in eager_params:
        np.testing.assert_allclose(np.array(compiled_params[name]), np.array(eager_params[name]), atol=1e-5,
                                   err_msg=name)


def test_overfits_a_repeated_batch():
    model = tiny_model(seed=4)
    step = train_mlx.make_train_step(model, tiny_optimizer(model), grad_accum_steps=1)
    batch = [random_batch(5)]
    losses = [step(batch, schedule()).item() for _ in range(40)]
    assert losses[0] > 4.0  # ~ln(128) at init
    assert losses[-1] < 0.5 * losses[0], losses


def test_nan_loss_fails_fast(capsys):
    model = tiny_model(seed=6)
    model.lm_head.weight = mx.full(model.lm_head.weight.shape, float("nan"))
    step = train_mlx.make_train_step(model, tiny_optimizer(model), grad_accum_steps=1)
    with pytest.raises(SystemExit) as exc:
        train_mlx.train(model, step, lambda: ([random_batch(7)], 1), time_budget=60, tokens_per_step=128,
                        flops_per_token=1.0, peak=1e9)
    assert exc.value.code == 1
    assert "FAIL: training loss is nan at step 0" in capsys.readouterr().out

# ---------------------------------------------------------------------------
# Linux CPU: tuned BLAS detection
# ---------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="the bundled reference BLAS is a Linux-wheel thing")
def test_detects_bundled_reference_blas():
    bundled = blas.bundled_reference_blas()
    assert bundled is not None and re.search(r"libblas[^/]*\.so", bundled)
    tuned = blas.find_tuned_blas()
    if tuned is not None and "openblas" in tuned:
        # this OpenBLAS knows this CPU unless it reports a generic core: then we name one
        override = blas.openblas_coretype_override(tuned)
        assert override in (None, "SkylakeX", "Haswell")


@pytest.mark.skipif(sys.platform != "linux" or not (blas.find_tuned_blas() or "").endswith("libopenblas.so.0"),
                    reason="needs a system OpenBLAS to preload")
def test_blas_threads_caps_the_preloaded_openblas():
    probe = ("import ctypes, sys; from harness.blas import set_blas_threads; "
             "line = set_blas_threads(int(sys.argv[1])); "
             "print(line, getattr(ctypes.CDLL(None), 'openblas_get_num_threads', str)())")
    preloaded = dict(os.environ, LD_PRELOAD=blas.find_tuned_blas(), OPENBLAS_NUM_THREADS="2")
    bundled = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}

    def run(n, env):
        return subprocess.run([sys.executable, "-c", probe, str(n)], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True).stdout.split()
    assert run(1, preloaded) == ["blas:", "1", "thread", "(openblas_set_num_threads)", "1"]
    assert run(0, preloaded) == ["None", "2"]  # 0 leaves the library's own count
    assert run(1, bundled) == ["None"]  # MLX's bundled reference BLAS has no threads to cap


def test_bf16_layout_trains():
    # What a GPU run uses (bf16 activations, matmuls and Muon; float32 parameters), emulated on this CPU.
    # Eager: compiled CPU kernels would only cost JIT time here and say nothing about a GPU.
    model = tiny_model(seed=8)
    model.dtype = mx.bfloat16
    optimizer = train_mlx.MuonAdamW(model, 0.004, 0.6, 0.04, 0.5, 0.2, (0.8, 0.95), muon_dtype=mx.bfloat16)
    step = train_mlx.make_train_step(model, optimizer, grad_accum_steps=1, compile=False)
    batch = [random_batch(9)]
    losses = [step(batch, schedule()).item() for _ in range(15)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == mx.float32 for p in model.flat_parameters().values())
    assert model(batch[0][0]).dtype == mx.float32  # logits for the harness


# ---------------------------------------------------------------------------
# Attention choice (the Metal kernels' self-test) and Muon numerics in bf16
# ---------------------------------------------------------------------------


@pytest.fixture
def attention_choice():
    yield
    train_mlx.USE_METAL_ATTENTION = False


def test_off_metal_the_attention_line_says_mlx_and_why(attention_choice, monkeypatch):
    model = tiny_model()
    assert train_mlx.choose_attention(model, mx.float32) == \
        "Attention: mx.fast.scaled_dot_product_attention (no Metal device)"
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "metal")
    with pytest.raises(SystemExit, match="AUTORESEARCH_ATTENTION=metal, but no Metal device"):
        train_mlx.choose_attention(model, mx.float32)
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "fast")
    with pytest.raises(SystemExit, match="not one of auto, metal, mlx"):
        train_mlx.choose_attention(model, mx.float32)


def test_kernels_that_pass_the_self_test_are_used(attention_choice, emulated_metal):
    model = tiny_model(n_head=1, n_kv_head=1)       # head dim 64: a kernel exists
    assert train_mlx.choose_attention(model, mx.float32) == "Attention: metal_kernels"
    assert train_mlx.USE_METAL_ATTENTION and emulated_metal[:3] == ["fa_fwd", "fa_bwd_dq", "fa_bwd_dkdv"]
    emulated_metal.clear()
    x, y = random_batch(0)
    mx.eval(model(x, y))
    assert "fa_fwd" in emulated_metal            # the model's forward went through the kernels


def test_grouped_query_attention_is_routed_to_mlx_and_said(attention_choice, emulated_metal):
    model = tiny_model(n_embd=128, n_head=2, n_kv_head=1)
    line = train_mlx.choose_attention(model, mx.float32)
    assert line == "Attention: mx.fast.scaled_dot_product_attention (no kernel for head dim 64 with 1 of 2 kv heads)"
    assert not train_mlx.USE_METAL_ATTENTION and emulated_metal == []


def test_kernels_that_fail_the_self_test_fall_back(attention_choice, emulated_metal, monkeypatch):
    attn_mod = sys.modules["metal_kernels.attention"]
    emulated = attn_mod._launch
    model = tiny_model(n_head=1, n_kv_head=1)

    def wrong_forward(call, args):          # a kernel that compiles but computes O 3% off
        outs = emulated(call, args)
        return [outs[0] * 1.03, *outs[1:]] if call.name == "fa_fwd" else outs
    monkeypatch.setattr(attn_mod, "_launch", wrong_forward)
    line = train_mlx.choose_attention(model, mx.float32)
    assert line.startswith("attention: metal_kernels failed self-test (output differs from the MLX path by 3.")
    assert line.endswith("; using mx.fast.scaled_dot_product_attention") and not train_mlx.USE_METAL_ATTENTION

    def compile_error(call, args):
        raise RuntimeError("[metal::Device] Unable to build metal library from source")
    monkeypatch.setattr(attn_mod, "_launch", compile_error)
    assert train_mlx.choose_attention(model, mx.float32) == (
        "attention: metal_kernels failed self-test (RuntimeError: [metal::Device] Unable to build metal library "
        "from source); using mx.fast.scaled_dot_product_attention")
    x, y = random_batch(0)
    assert math.isfinite(model(x, y).item())     # the run goes on, on MLX's attention
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "metal")
    with pytest.raises(SystemExit, match="AUTORESEARCH_ATTENTION=metal stops here"):
        train_mlx.choose_attention(model, mx.float32)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (round to nearest even), kept as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)


def bf16_accumulated_sum(x: np.ndarray, lanes: int = 1024) -> float:
    """sum(x) as a GPU reduction with a bf16 accumulator adds it up: each of `lanes` threads
    sums its strided share, rounding to bf16 after every add, then the partials are summed."""
    parts = x.reshape(-1, lanes)
    acc = np.zeros(lanes, dtype=np.float32)
    for row in parts:
        acc = to_bf16(acc + row)
    return float(acc.sum(dtype=np.float64))


def test_muon_normalises_in_float32_when_it_computes_in_bf16(monkeypatch):
    # a low-rank update (momentum makes them so): its top singular value is most of its norm
    key_u, key_v, key_n = mx.random.split(mx.random.key(7), 3)
    g = 10 * mx.random.normal((2048, 1), key=key_u) @ mx.random.normal((1, 512), key=key_v) \
        + 0.3 * mx.random.normal((2048, 512), key=key_n)
    squares = np.array(g.astype(mx.bfloat16).astype(mx.float32)) ** 2
    exact = float(np.sqrt(squares.sum(dtype=np.float64)))
    assert math.sqrt(bf16_accumulated_sum(squares.ravel())) < 0.95 * exact   # the hazard: a bf16 accumulator

    real_sum = mx.sum

    def metal_like_sum(x, *args, **kwargs):       # Metal's reduction of bf16 input, emulated
        if x.dtype != mx.bfloat16:
            return real_sum(x, *args, **kwargs)
        total = bf16_accumulated_sum(np.array(x.astype(mx.float32)).ravel())
        return mx.array(total, dtype=mx.bfloat16).reshape((1,) * x.ndim)
    monkeypatch.setattr(mx, "sum", metal_like_sum)
    X = train_mlx.orthogonalize(g, ns_steps=0, dtype=mx.bfloat16)
    top = np.linalg.svd(np.array(X.astype(mx.float32)), compute_uv=False).max()
    assert X.dtype == mx.bfloat16 and 0.9 < top <= 1.0, top   # about 1.07 with the norm summed in bf16
    full = train_mlx.orthogonalize(g, dtype=mx.bfloat16)
    singular = np.linalg.svd(np.array(full.astype(mx.float32)), compute_uv=False)
    assert np.isfinite(singular).all() and singular.max() < 1.3


def test_head_dim_128_takes_mlx_attention_unless_asked(attention_choice, emulated_metal, monkeypatch):
    model = tiny_model(n_embd=128, n_head=1, n_kv_head=1)         # the default model's head dim
    assert train_mlx.choose_attention(model, mx.float32) == ("Attention: mx.fast.scaled_dot_product_attention "
        "(head dim 128: MLX's attention is expected faster; AUTORESEARCH_ATTENTION=metal takes the kernels)")
    assert emulated_metal == []
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "metal")
    assert train_mlx.choose_attention(model, mx.float32) == "Attention: metal_kernels"
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "mlx")
    assert train_mlx.choose_attention(model, mx.float32) == \
        "Attention: mx.fast.scaled_dot_product_attention (AUTORESEARCH_ATTENTION=mlx)"
