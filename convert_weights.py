"""
Move GPT weights between the two trainers: train.py (torch) and train_mlx.py (MLX).

Both trainers name their parameters as upstream's torch model does
(transformer.wte.weight, transformer.h.0.attn.c_q.weight, ..., lm_head.weight,
resid_lambdas, x0_lambdas, value_embeds.<layer>.weight) and store linear weights
as (out, in), so one safetensors file serves both: float32 tensors under those
names, with the GPTConfig as JSON in the file's metadata.

    uv run convert_weights.py SRC DST.safetensors [--verify]

SRC: a torch state dict (.pt/.pth, e.g. torch.save(model.state_dict()) on an H100),
or a .safetensors/.npz file from either trainer (MLX's model.save_weights).
--verify loads DST into both backends and compares their logits on random tokens.
This file is part of the harness, not of the agent-edited training files.
"""

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

FORMAT = "autoresearch-gpt/1"
CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


class ConversionError(ValueError):
    """The weights do not fit the model: the message names the tensors and the fix."""


def _canonical_name(name):
    # torch.compile wraps the model: its state dict keys start with "_orig_mod."
    return name[len("_orig_mod."):] if name.startswith("_orig_mod.") else name

# ---------------------------------------------------------------------------
# Models -> {name: float32 numpy array}
# ---------------------------------------------------------------------------


def torch_arrays(model):
    """Parameters of a train.GPT (compiled or not, any device, bf16 or float32) as float32 numpy."""
    return {_canonical_name(name): p.detach().float().cpu().numpy() for name, p in model.named_parameters()}


def mlx_arrays(model):
    """Parameters of a train_mlx.GPT as float32 numpy."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    return {name: np.array(p.astype(mx.float32)) for name, p in tree_flatten(model.parameters())}

# ---------------------------------------------------------------------------
# {name: array} -> models (strict: every parameter, nothing extra, same shapes)
# ---------------------------------------------------------------------------


def _check_match(expected_shapes, arrays, target):
    missing = sorted(set(expected_shapes) - set(arrays))
    extra = sorted(set(arrays) - set(expected_shapes))
    wrong = sorted(f"{n}: file {tuple(arrays[n].shape)} vs model {tuple(expected_shapes[n])}"
                   for n in set(expected_shapes) & set(arrays) if tuple(arrays[n].shape) != tuple(expected_shapes[n]))
    if missing or extra or wrong:
        lines = [f"the weights do not fit the {target} model:"]
        if missing:
            lines.append(f"  missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if extra:
            lines.append(f"  not in the model: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
        if wrong:
            lines.append(f"  shape mismatch: {'; '.join(wrong[:8])}")
        lines.append("  Build the model from the file's own config (load_weights returns it), or convert a "
                     "checkpoint of the same GPT family.")
        raise ConversionError("\n".join(lines))


def load_into_torch(model, arrays):
    """Copy arrays into a train.GPT in place, keeping each parameter's device and dtype."""
    import torch
    params = {_canonical_name(n): p for n, p in model.named_parameters()}
    _check_match({n: p.shape for n, p in params.items()}, arrays, "torch")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.ascontiguousarray(arrays[name], dtype=np.float32)).to(p.device, p.dtype))
    return model


def load_into_mlx(model, arrays):
    """Set a train_mlx.GPT's parameters from arrays, keeping each parameter's dtype."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    current = dict(tree_flatten(model.parameters()))
    _check_match({n: p.shape for n, p in current.items()}, arrays, "MLX")
    for name, old in current.items():
        *path, leaf = name.split(".")
        node = model
        for part in path:  # lists (transformer.h) take integer indices; modules and dicts take keys
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[leaf] = mx.array(np.ascontiguousarray(arrays[name], dtype=np.float32)).astype(old.dtype)
    mx.eval(model.parameters())
    return model

# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def config_dict(config):
    return {k: v for k, v in asdict(config).items() if k in CONFIG_KEYS}


def infer_config(arrays, sequence_len=2048, window_pattern="SSSL"):
    """GPTConfig fields from the tensor shapes. The last layer always has a value-embedding
    gate whose output size is n_kv_head, which fixes the head dimension."""
    try:
        vocab_size, n_embd = arrays["transformer.wte.weight"].shape
        n_layer = len({n.split(".")[2] for n in arrays if n.startswith("transformer.h.")})
        n_kv_head = arrays[f"transformer.h.{n_layer - 1}.attn.ve_gate.weight"].shape[0]
        head_dim = arrays["transformer.h.0.attn.c_k.weight"].shape[0] // n_kv_head
    except KeyError as exc:
        raise ConversionError(f"not a GPT of this family: no tensor {exc.args[0]!r}") from None
    return dict(sequence_len=sequence_len, vocab_size=int(vocab_size), n_layer=n_layer, n_head=int(n_embd // head_dim),
                n_kv_head=int(n_kv_head), n_embd=int(n_embd), window_pattern=window_pattern)


def save_weights(path, arrays, config):
    """Write float32 arrays and the config (a GPTConfig or dict) to a safetensors file."""
    from safetensors.numpy import save_file
    cfg = config if isinstance(config, dict) else config_dict(config)
    tensors = {_canonical_name(n): np.ascontiguousarray(a, dtype=np.float32) for n, a in arrays.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(cfg, sort_keys=True)})


def load_weights(path):
    """(arrays, config dict) from a safetensors file written by save_weights (config inferred if absent)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        arrays = {_canonical_name(n): f.get_tensor(n).astype(np.float32) for n in f.keys()}
    config = json.loads(metadata["config"]) if "config" in metadata else infer_config(arrays)
    return arrays, config


def read_any(path):
    """(arrays, config or None) from .safetensors, .npz, or a torch .pt/.pth state dict."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        if "config" in metadata:
            return load_weights(path)
        # MLX's save_weights stores bf16 as bf16, which numpy cannot hold: read through torch or MLX
        import mlx.core as mx
        loaded = mx.load(str(path))
        return {_canonical_name(n): np.array(a.astype(mx.float32)) for n, a in loaded.items()}, None
    if suffix == ".npz":
        with np.load(path) as data:
            return {_canonical_name(n): data[n].astype(np.float32) for n in data.files}, None
    if suffix in (".pt", ".pth", ".bin"):
        import torch
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        return {_canonical_name(n): t.detach().float().numpy() for n, t in state.items()
                if hasattr(t, "detach") and not _canonical_name(n) in ("cos", "sin")}, None
    raise ConversionError(f"{path}: unknown weights format {suffix!r}; use .safetensors, .npz, .pt or .pth")

# ---------------------------------------------------------------------------
# Building models from a file
# ---------------------------------------------------------------------------


def torch_model(config, arrays=None, device="cpu"):
    """A float32 train.GPT on `device` built from a config dict, loaded with arrays if given."""
    import torch
    import train
    cfg = train.GPTConfig(**{k: config[k] for k in CONFIG_KEYS if k in config})
    with torch.device("meta"):
        model = train.GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()  # also rebuilds the rotary tables, which to_empty leaves uninitialized
    if arrays is not None:
        load_into_torch(model, arrays)
    return model.eval()


def mlx_model(config, arrays=None):
    """A float32 train_mlx.GPT built from a config dict, loaded with arrays if given."""
    import train_mlx
    known = {f.name for f in fields(train_mlx.GPTConfig)}
    model = train_mlx.GPT(train_mlx.GPTConfig(**{k: v for k, v in config.items() if k in known}))
    if arrays is not None:
        load_into_mlx(model, arrays)
    return model


def compare_logits(config, arrays, batch=2, seq_len=None, seed=0):
    """Max |torch - MLX| / max |torch| of the logits of both backends on random tokens (float32, CPU)."""
    import mlx.core as mx
    import torch
    T = min(seq_len or config["sequence_len"], config["sequence_len"])
    tokens = np.random.default_rng(seed).integers(0, config["vocab_size"], size=(batch, T))
    with torch.no_grad():
        a = torch_model(config, arrays)(torch.from_numpy(tokens)).numpy()
    b = np.array(mlx_model(config, arrays)(mx.array(tokens.astype(np.int32))))
    return float(np.abs(a - b).max() / np.abs(a).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("src", help="weights to read: .pt/.pth (torch state dict), .safetensors or .npz")
    parser.add_argument("dst", help="safetensors file to write (loadable by train.py and train_mlx.py)")
    parser.add_argument("--sequence-len", type=int, default=None, help="config when SRC has none (default 2048)")
    parser.add_argument("--window-pattern", default=None, help="config when SRC has none (default SSSL)")
    parser.add_argument("--verify", action="store_true", help="compare torch and MLX logits of the result")
    args = parser.parse_args(argv)
    try:
        arrays, config = read_any(args.src)
        if config is None:
            config = infer_config(arrays, args.sequence_len or 2048, args.window_pattern or "SSSL")
        else:
            config = dict(config, **{k: v for k, v in (("sequence_len", args.sequence_len),
                                                       ("window_pattern", args.window_pattern)) if v is not None})
        if not str(args.dst).endswith(".safetensors"):
            raise ConversionError(f"{args.dst}: the output must be a .safetensors file")
        try:  # the names and shapes must fit a real model before anything is written
            torch_model(config, arrays)
        except ImportError:  # no torch here (a Mac): check against the MLX model instead
            load_into_mlx(mlx_model(config), arrays)
        save_weights(args.dst, arrays, config)
        n = sum(a.size for a in arrays.values())
        print(f"wrote {args.dst}: {len(arrays)} tensors, {n / 1e6:.2f}M parameters, config {json.dumps(config)}")
        if args.verify:
            err = compare_logits(config, arrays, seq_len=min(config["sequence_len"], 256))
            print(f"torch vs MLX logits (float32, CPU): max relative error {err:.2e}")
            if err > 1e-4:
                print("parity FAILED: above 1e-4")
                return 1
    except ConversionError as exc:
        print(f"convert_weights: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
