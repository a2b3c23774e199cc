"""Backend parity: the same weights give the same logits and the same val_bpb in train.py
(torch) and train_mlx.py (MLX), float32 on a CPU; and convert_weights.py moves them."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import convert_weights as cw  # noqa: E402

# GQA (4 query heads, 2 kv heads), value embeddings on layers 0 and 2, and T=64 so the
# "S" layers (window 32) really differ from causal attention.
CONFIG = dict(sequence_len=64, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL")


def randomize(model, seed=0):
    """Weights with every path active: upstream's init zeroes the output projections and
    gates, which would hide a mismatch in attention, MLP or value embeddings."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wte.weight",)) or name.startswith("value_embeds."):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            else:  # resid_lambdas, x0_lambdas
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model


def max_rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_same_weights_same_logits():
    arrays = cw.torch_arrays(randomize(cw.torch_model(CONFIG)))
    err = cw.compare_logits(CONFIG, arrays, batch=2)
    assert err <= 1e-4, err
    # The check has teeth: another window pattern on one side is far off.
    tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], size=(2, 64))
    with torch.no_grad():
        causal_torch = cw.torch_model(dict(CONFIG, window_pattern="L"), arrays)(torch.from_numpy(tokens)).numpy()
    windowed_mlx = np.array(cw.mlx_model(CONFIG, arrays)(mx.array(tokens.astype(np.int32))))
    assert max_rel_err(causal_torch, windowed_mlx) > 1e-3


def test_round_trip_through_both_backends_is_exact(tmp_path):
    model = randomize(cw.torch_model(CONFIG), seed=1)
    model.embeddings_to_bf16()  # as train.py keeps them on CUDA: the file holds float32
    first = tmp_path / "torch.safetensors"
    cw.save_weights(first, cw.torch_arrays(model), model.config)
    arrays, config = cw.load_weights(first)
    assert config == CONFIG
    assert all(a.dtype == np.float32 for a in arrays.values())
    mlx_model = cw.mlx_model(config, arrays)
    second = tmp_path / "mlx.safetensors"
    cw.save_weights(second, cw.mlx_arrays(mlx_model), config)
    back, _ = cw.load_weights(second)
    restored = cw.torch_model(config, back)
    for name, p in model.named_parameters():
        assert torch.equal(p.float(), dict(restored.named_parameters())[name]), name


def test_cli_converts_a_compiled_torch_state_dict(tmp_path, capsys):
    model = randomize(cw.torch_model(CONFIG), seed=2)
    # torch.compile'd models save their keys under "_orig_mod."; rotary tables are not saved
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "ckpt.pt")
    out = tmp_path / "out.safetensors"
    assert cw.main([str(tmp_path / "ckpt.pt"), str(out), "--sequence-len", "64", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "max relative error" in printed and "FAILED" not in printed
    arrays, config = cw.load_weights(out)
    assert config == CONFIG  # inferred from the shapes: the head count from the last layer's gate
    np.testing.assert_array_equal(arrays["lm_head.weight"], model.lm_head.weight.detach().numpy())


def test_mismatched_weights_are_refused_with_names(tmp_path, capsys):
    arrays = cw.torch_arrays(cw.torch_model(CONFIG))
    arrays.pop("x0_lambdas")
    arrays["transformer.h.0.mlp.c_fc.weight"] = np.zeros((8, 8), np.float32)
    with pytest.raises(cw.ConversionError) as err:
        cw.load_into_mlx(cw.mlx_model(CONFIG), arrays)
    assert "missing: x0_lambdas" in str(err.value)
    assert "transformer.h.0.mlp.c_fc.weight: file (8, 8) vs model (256, 64)" in str(err.value)
    with pytest.raises(cw.ConversionError, match="x0_lambdas"):
        cw.load_into_torch(cw.torch_model(CONFIG), arrays)
    assert cw.main([str(tmp_path / "nope.pt"), str(tmp_path / "x.safetensors")]) == 2
    assert "nope.pt: no such file" in capsys.readouterr().err


BPB_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import convert_weights as cw
    import prepare
    arrays, config = cw.load_weights(sys.argv[1])
    # The smoke profile's rows, fewer of them: MLX's Linux CPU build (reference BLAS) is slow.
    prepare.PROFILE = prepare.Profile("smoke", 256, 15, 16 * 256)
    tokenizer = prepare.Tokenizer.from_directory()
    torch_bpb = prepare.evaluate_bpb(cw.torch_model(config, arrays), tokenizer, 8)
    mlx_bpb = prepare.evaluate_bpb(cw.mlx_model(config, arrays), tokenizer, 5)  # a padded last batch
    print(json.dumps({"torch": torch_bpb, "mlx": mlx_bpb, "eval_tokens": prepare.summary_fields()["eval_tokens"]}))
''')


def test_same_weights_same_val_bpb(builtin_cache, tmp_path):
    # The real harness metric on the builtin validation rows (smoke profile: T=256, windows of 128).
    config = dict(CONFIG, sequence_len=256, vocab_size=8192, n_embd=32)
    model = randomize(cw.torch_model(config), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.2)  # keep the loss in a trained-like range (a few bits per byte)
    weights = tmp_path / "weights.safetensors"
    cw.save_weights(weights, cw.torch_arrays(model), config)
    env = {**os.environ, **builtin_cache, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", BPB_SCRIPT, str(weights)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    bpb = json.loads(result.stdout.strip().splitlines()[-1])
    assert bpb["eval_tokens"] == 16 * 256
    assert 0 < bpb["torch"] < 50
    assert abs(bpb["torch"] - bpb["mlx"]) <= 1e-4, bpb
