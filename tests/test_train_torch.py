"""train.py, the torch trainer: attention semantics, the FA3 fallback, the optimizer, and
real CPU runs of `train.py` as a subprocess."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402


def reference_attention(q, k, v, window):
    """Attention written from the convention, one query at a time: query i sees keys
    i - window .. i (all earlier keys when window is None). q: (B, T, H, D); k, v may
    have fewer heads (grouped-query)."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    out = torch.empty_like(q, dtype=torch.float64)
    qd, kd, vd = q.double(), k.double(), v.double()
    for i in range(T):
        lo = 0 if window is None else max(0, i - window)
        for h in range(H):
            keys, values = kd[:, lo:i + 1, h // group], vd[:, lo:i + 1, h // group]
            scores = torch.einsum("bd,bjd->bj", qd[:, i, h], keys) / math.sqrt(D)
            out[:, i, h] = torch.einsum("bj,bjd->bd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("window", [None, 0, 1, 5, 16, 30, 31, 32, 100])
def test_sdpa_sliding_window_matches_reference(window):
    torch.manual_seed(0)
    T = 32
    q = torch.randn(2, T, 4, 16)
    k, v = torch.randn(2, T, 2, 16), torch.randn(2, T, 2, 16)  # grouped-query: 2 kv heads for 4 query heads
    got = train.sdpa_attention(q, k, v, window)
    want = reference_attention(q, k, v, window)
    assert got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_flex_attention_matches_reference():
    # flex is the CUDA fallback when FA3 cannot load; eager on a CPU it runs the same mask_mod.
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 48, 2, 16) for _ in range(3))
    for window in (7, 24, None):
        torch.testing.assert_close(train.flex_attention(q, k, v, window).double(),
                                   reference_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_window_pattern_sssl_last_layer_long():
    config = train.GPTConfig(sequence_len=256, n_layer=6, window_pattern="SSSL")
    assert train.window_sizes_for(config) == [128, 128, 128, 256, 128, 256]
    with pytest.raises(ValueError, match="window_pattern"):
        train.window_sizes_for(train.GPTConfig(window_pattern="SXL"))


@pytest.mark.parametrize("softcap", [15, 0])
def test_model_forward_logits_and_loss(monkeypatch, softcap):
    monkeypatch.setattr(train, "LOSS_CHUNK", 24)
    monkeypatch.setattr(train, "LOGIT_SOFTCAP", softcap)
    torch.manual_seed(0)
    config = train.GPTConfig(sequence_len=32, vocab_size=97, n_layer=3, n_head=2, n_kv_head=1, n_embd=64)
    model = train.GPT(config)
    model.init_weights()
    model.lm_head.weight.data.normal_(0, 3)  # logits past the soft-cap
    x = torch.randint(0, 97, (2, 32))
    logits = model(x)
    assert logits.shape == (2, 32, 97) and logits.dtype == torch.float32
    assert (logits.abs().max() <= 15) == (softcap == 15)
    targets = x.masked_fill(torch.arange(32) % 5 == 0, -1)
    loss = model(x, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.view(-1, 97), targets.view(-1),
                                                                       ignore_index=-1))
    # causal: changing a later token leaves the logits of earlier positions unchanged
    with torch.no_grad():
        for block in model.transformer.h:  # zero-initialized projections would hide any leak
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 1) % 97
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("softcap", [15, 0])
def test_chunked_lm_head_loss_matches_autograd(monkeypatch, softcap):
    """Loss and both gradients equal autograd of the plain formula (LM head, soft-cap or none,
    ignored targets), with rows split over several chunks and a ragged last one."""
    monkeypatch.setattr(train, "LOSS_CHUNK", 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=g, requires_grad=True)
    w = (torch.randn(50, 16, generator=g) * 3).requires_grad_()  # logits far past the soft-cap
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[::5] = -1  # ignored
    logits = softcap * torch.tanh(x @ w.T / softcap) if softcap else x @ w.T
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w))
    loss = train.LMHeadLoss.apply(x, w, targets, softcap) / (targets >= 0).sum()
    dx, dw = torch.autograd.grad(loss, (x, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(dx, ref_dx)
    torch.testing.assert_close(dw, ref_dw)


def test_muon_adamw_trains_a_tiny_model():
    torch.manual_seed(0)
    config = train.GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = train.GPT(config)
    model.init_weights()
    optimizer = model.setup_optimizer(weight_decay=0.1)
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, 1)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(10):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
    muon_groups = [g for g in optimizer.param_groups if g["kind"] == "muon"]
    assert {tuple(g["params"][0].shape) for g in muon_groups} == {(64, 64), (256, 64), (64, 256), (2, 32)}


def test_cuda_dtype_layout_trains(monkeypatch):
    """What main() does on CUDA, emulated on a CPU: bf16 embedding tables, bf16 autocast,
    a float32 loss, and bf16 Newton-Schulz in Muon."""
    torch.manual_seed(0)
    config = train.GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.embeddings_to_bf16()
    optimizer = model.setup_optimizer()
    ortho_dtypes = []
    muon_step = optimizer._muon_step

    def bf16_muon_step(*args):
        ortho_dtypes.append(args[-1])
        return muon_step(*args[:-1], torch.bfloat16)
    optimizer._muon_step = bf16_muon_step
    x = torch.randint(0, 128, (4, 64))
    y = torch.roll(x, -1, 1)
    losses = []
    for _ in range(6):
        with torch.amp.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, y)
        assert loss.dtype == torch.float32
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert ortho_dtypes and losses[-1] < 0.7 * losses[0], losses
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.c_q.weight.dtype == torch.float32  # master weights stay float32


# --- FA3 loader -----------------------------------------------------------------------

def test_fa3_loader_falls_back_when_kernels_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` raises ImportError
    assert train.load_flash_attention_3((9, 0)) is None
    assert "Flash Attention 3 unavailable" in capsys.readouterr().out


def test_fa3_loader_falls_back_when_the_loader_raises(monkeypatch, capsys):
    import types
    fake = types.ModuleType("kernels")
    requested = []

    def get_kernel(repo):
        requested.append(repo)
        raise ConnectionError("hub unreachable")
    fake.get_kernel = get_kernel
    monkeypatch.setitem(sys.modules, "kernels", fake)
    assert train.load_flash_attention_3((9, 0)) is None
    assert train.load_flash_attention_3((8, 0)) is None
    assert requested == ["varunneal/flash-attention-3", "kernels-community/flash-attn3"]
    assert "ConnectionError: hub unreachable" in capsys.readouterr().out


def test_cpu_never_asks_the_hub(monkeypatch):
    monkeypatch.setattr(train, "load_flash_attention_3", lambda cap: pytest.fail("CPU must not load FA3"))
    assert train.choose_attention(torch.device("cpu")) == "sdpa"
    assert train.choose_attention(torch.device("cpu"), "fa3") == "sdpa"
    with pytest.raises(SystemExit, match="AUTORESEARCH_ATTENTION"):
        train.choose_attention(torch.device("cpu"), "flash")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        train.choose_attention(torch.device("cpu"), "flex")


KERNELS_STANDIN = '''
"""Stand-in for the `kernels` package (not installed on CPU machines): it fetches the
kernel repo from the Hugging Face hub with the real hub client, as `kernels` does."""
from huggingface_hub import snapshot_download

def get_kernel(repo_id, revision=None):
    snapshot_download(repo_id, revision=revision, allow_patterns=["build/*"])
    raise AssertionError("the hub was supposed to be unreachable")
'''

CHOOSE_ON_A_PRETEND_HOPPER = '''
import torch, train
torch.cuda.get_device_capability = lambda device=None: (9, 0)
print("attention:", train.choose_attention(torch.device("cuda"), "auto"))
'''


def test_fa3_falls_back_to_flex_when_hub_is_unreachable(tmp_path):
    # A hub endpoint where nothing listens (HF_HUB_OFFLINE=1 takes the same path, measured).
    hub_env = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    # The real `kernels` package when installed (the cuda extra), else the stand-in above.
    try:
        import kernels  # noqa: F401
        pythonpath = str(REPO)
    except ImportError:
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text(KERNELS_STANDIN)
        pythonpath = os.pathsep.join([str(tmp_path), str(REPO)])
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(PYTHONPATH=pythonpath, HF_HOME=str(tmp_path / "hf_home"), **hub_env)
    result = subprocess.run([sys.executable, "-c", CHOOSE_ON_A_PRETEND_HOPPER], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Flash Attention 3 unavailable" in result.stdout
    assert "attention: flex" in result.stdout


# --- real runs of train.py ------------------------------------------------------------

def parse_summary(stdout):
    assert "\n---\n" in stdout, stdout[-2000:]
    block = stdout.split("\n---\n")[-1].strip().splitlines()
    return dict(line.split(":", 1) for line in block), [line.split(":", 1)[0] for line in block]


SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth", "backend", "device",
                "dataset", "profile", "eval_tokens", "unigram_bpb"]


def run_train(script, builtin_env, timeout=240):
    """Run a copy of train.py (smoke profile, builtin data, CPU) as `uv run train.py` would."""
    env = {**os.environ, **builtin_env, "AUTORESEARCH_DEVICE": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cpu_smoke_run_prints_a_valid_summary(builtin_cache):
    result = run_train(REPO / "train.py", builtin_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary, keys = parse_summary(result.stdout)
    assert keys == SUMMARY_KEYS
    values = {k: v.strip() for k, v in summary.items()}
    assert values["backend"] == "cuda" and values["device"].endswith("(cpu)")
    assert values["dataset"] == "builtin" and values["profile"] == "smoke"
    val_bpb = float(values["val_bpb"])
    assert 0 < val_bpb < 8, val_bpb  # trained: below the ~uniform-prediction bpb of a fresh model
    assert int(values["eval_tokens"]) > 0
    assert float(values["training_seconds"]) >= 15 - 0.05  # the smoke profile's budget
    steps = int(values["num_steps"])
    assert steps >= 2
    assert float(values["total_tokens_M"]) == pytest.approx(steps * 8 * 256 / 1e6, abs=0.051)
    assert float(values["peak_vram_mb"]) > 0  # process peak RSS on a CPU
    assert 0 < float(values["mfu_percent"]) < 100


@pytest.mark.parametrize("loss", [float("nan"), 101.0])
def test_check_loss_ends_the_run(loss, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.check_loss(loss, 7)
    assert exit_info.value.code == 1
    assert f"FAIL: training loss is {loss} at step 7" in capsys.readouterr().out
    train.check_loss(3.5, 8)  # a normal loss passes


@pytest.mark.slow
def test_nan_loss_fails_fast(builtin_cache, tmp_path):
    # An agent's edit that blows up the model must end the run at once with a clear line.
    source = (REPO / "train.py").read_text()
    assert "MATRIX_LR = 0.04" in source
    broken = tmp_path / "train.py"
    broken.write_text(source.replace("MATRIX_LR = 0.04", "MATRIX_LR = float('nan')"))
    result = run_train(broken, builtin_cache, timeout=120)
    assert result.returncode == 1
    assert "FAIL: training loss is nan" in result.stdout
    assert "\n---\n" not in result.stdout


@pytest.mark.slow
def test_compiled_paths_on_cpu(monkeypatch):
    """The CUDA code paths that a CPU can run: torch.compile of the model and of the fused
    optimizer steps (fullgraph), and compiled flex attention (forward; flex has no CPU backward).
    Minutes on a small CPU, which is why train.py compiles on CUDA only."""
    torch.manual_seed(0)
    config = train.GPTConfig(sequence_len=128, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = train.GPT(config)
    model.init_weights()
    optimizer = model.setup_optimizer(compile=True)
    monkeypatch.setattr(train, "ATTENTION_KIND", "sdpa")
    compiled = torch.compile(model, dynamic=False)
    x = torch.randint(0, 256, (2, 128))
    losses = []
    for _ in range(3):
        loss = compiled(x, x)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        eager_sdpa = model(x)
        monkeypatch.setattr(train, "ATTENTION_KIND", "flex")
        torch._dynamo.reset()
        compiled_flex = torch.compile(model, dynamic=False)(x)
    torch.testing.assert_close(compiled_flex, eager_sdpa, rtol=1e-4, atol=1e-4)
