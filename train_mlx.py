"""
Autoresearch pretraining script for MLX. Single device, single file.
Runs on an Apple GPU (Metal), an NVIDIA GPU (mlx[cuda]) or a CPU.
Same model, optimizer and schedules as upstream's train.py (nanochat GPT, Muon + AdamW).
Usage: uv run train_mlx.py
"""

import os
import sys

from prepare import use_tuned_blas

if __name__ == "__main__":
    use_tuned_blas()  # Linux CPUs: re-run once with OpenBLAS/MKL preloaded over MLX's slow bundled BLAS

import gc
import math
import time
from dataclasses import dataclass, asdict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from prepare import (PROFILE, SEED, Tokenizer, apple_gpu_cores, ensure_prepared, evaluate_bpb, fit_device_batch,
                     make_dataloader, memory_limit, peak_flops, peak_source, profile_line, set_blas_threads,
                     summary_fields)

try:  # custom Metal attention kernels (forward + backward); absent or unused off Metal
    import metal_kernels
except ImportError:
    metal_kernels = None
USE_METAL_ATTENTION = False  # set by choose_attention(), after the kernels pass their self-test

# ---------------------------------------------------------------------------
# GPT Model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 2
    n_kv_head: int = 2
    n_embd: int = 256
    window_pattern: str = "SSSL"


def norm(x):
    # eps as torch's F.rms_norm default (the dtype's machine epsilon), for parity with train.py
    return mx.fast.rms_norm(x, None, mx.finfo(x.dtype).eps)


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    # x: (B, T, H, D); rotate the two halves of the head dim (upstream's sign convention)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return mx.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def window_mask(T, window):
    """Boolean (T, T) mask: query i sees key j iff i - window <= j <= i (FA3's window_size=(window, 0))."""
    offset = mx.arange(T)[:, None] - mx.arange(T)[None, :]
    return (offset >= 0) & (offset <= window)


def attention(q, k, v, window, scale):
    """q, k, v: (B, H, T, D). window=None or >= T-1 is plain causal."""
    T = q.shape[2]
    if window is not None and window >= T - 1:
        window = None
    if USE_METAL_ATTENTION:
        return metal_kernels.attention(q, k, v, window=window, scale=scale)
    if mx.default_device() == mx.cpu and T > ATTN_BLOCK and k.shape[1] == q.shape[1]:
        return blocked_attention(q, k, v, T - 1 if window is None else window, scale)[0]
    mask = "causal" if window is None else window_mask(T, window)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


ATTN_BLOCK = 256  # query rows per block of the CPU attention


def attention_blocks(T, window):
    """(first query, end, first key) per block: keys before the first key are outside every
    query's window, keys past the end are in the future."""
    return [(lo, min(lo + ATTN_BLOCK, T), max(0, lo - window)) for lo in range(0, T, ATTN_BLOCK)]


def block_scores(q_block, k, lo, hi, k0, window, scale):
    s = (q_block @ k[:, :, k0:hi].swapaxes(-1, -2)).astype(mx.float32) * scale
    offset = mx.arange(lo, hi)[:, None] - mx.arange(k0, hi)[None, :]
    return mx.where((offset >= 0) & (offset <= window), s, -mx.inf)


@mx.custom_function
def blocked_attention(q, k, v, window, scale):
    """Causal (sliding-window) attention one block of ATTN_BLOCK queries at a time, returning the
    output and the rows' log-sum-exp.

    Why: MLX's attention on a CPU materialises the whole (T, T) score matrix per head, and its
    autodiff keeps the float32 probabilities of every layer for the backward: 512 MiB a layer
    for 16 x 2048 tokens. Here a block sees only the keys it can attend to (about half the
    FLOPs of a full causal product), and the backward recomputes each block's probabilities
    from the saved log-sum-exp (FlashAttention's recipe) instead of storing them.
    """
    outs, lses = [], []
    for lo, hi, k0 in attention_blocks(q.shape[2], window):
        q_b = q[:, :, lo:hi] if not outs else mx.depends(q[:, :, lo:hi], [outs[-1], lses[-1]])
        s = block_scores(q_b, k, lo, hi, k0, window, scale)
        lse = mx.logsumexp(s, axis=-1, keepdims=True)
        outs.append(mx.exp(s - lse).astype(v.dtype) @ v[:, :, k0:hi])
        lses.append(lse)
    return mx.concatenate(outs, axis=2), mx.concatenate(lses, axis=2)


@blocked_attention.vjp
def _blocked_attention_vjp(primals, cotangents, outputs):
    q, k, v, window, scale = primals
    do, (o, lse) = cotangents[0], outputs
    T = q.shape[2]
    delta = (do.astype(mx.float32) * o.astype(mx.float32)).sum(axis=-1, keepdims=True)
    dq, dk, dv = [], mx.zeros(k.shape, mx.float32), mx.zeros(v.shape, mx.float32)
    for lo, hi, k0 in attention_blocks(T, window):
        q_b, do_b = q[:, :, lo:hi], do[:, :, lo:hi]
        if dq:  # wait for the block before (as in the forward): else MLX runs every block's scores at once
            q_b, do_b = mx.depends([q_b, do_b], [dq[-1], dk, dv])
        p = mx.exp(block_scores(q_b, k, lo, hi, k0, window, scale) - lse[:, :, lo:hi])
        ds = p * ((do_b @ v[:, :, k0:hi].swapaxes(-1, -2)).astype(mx.float32) - delta[:, :, lo:hi])
        dq.append((ds.astype(q.dtype) @ k[:, :, k0:hi]) * scale)
        keys = [(0, 0), (0, 0), (k0, T - hi), (0, 0)]   # this block's keys, placed among all T
        dk = dk + mx.pad((ds.swapaxes(-1, -2).astype(q.dtype) @ q_b).astype(mx.float32) * scale, keys)
        dv = dv + mx.pad((p.swapaxes(-1, -2).astype(do.dtype) @ do_b).astype(mx.float32), keys)
    return mx.concatenate(dq, axis=2), dk.astype(k.dtype), dv.astype(v.dtype), None, None


# Rows of logits alive at a time, per stream. A CPU streams each elementwise pass over a chunk
# through memory: 256 x 8192 float32 (8 MiB) stays in cache; 2048 rows ran the cpu loss 1.5x slower.
LOSS_CHUNK = 256 if mx.default_device() == mx.cpu else 2048
_LOSS_STREAMS = []
EXP_TAYLOR = [1 / math.factorial(k) for k in range(8)]  # exp's Taylor coefficients to degree 7


def fast_exp(x):
    """exp(x) from multiplies and adds, for |x| <= 32 (clamped there), relative error < 2e-5:
    exp(x/64) by its Taylor series to degree 7, squared six times.

    Why: MLX's CPU exp and tanh are scalar library calls (15 and 29 ns an element on an x86
    core, an add is 2), and the loss takes one of each per logit: 84% of the cpu profile's step.
    """
    y = mx.clip(x, -32, 32) * (1 / 64)
    p = EXP_TAYLOR[-1]
    for c in reversed(EXP_TAYLOR[:-1]):  # coefficients, not y / k: a CPU divide costs several multiplies
        p = p * y + c
    for _ in range(6):
        p = p * p
    return p


def exp(x):
    return fast_exp(x) if mx.default_device() == mx.cpu else mx.exp(x)


def tanh(x):
    return 1 - 2 / (fast_exp(2 * x) + 1) if mx.default_device() == mx.cpu else mx.tanh(x)


def loss_streams():
    """On a CPU, MLX runs each elementwise op on one thread, and the loss over the (tokens, vocab)
    logits is most of a step: chunks alternate between CPU streams, which run in parallel."""
    if not _LOSS_STREAMS:
        if mx.default_device() == mx.cpu:
            _LOSS_STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(min(os.cpu_count() or 1, 8)))
        else:
            _LOSS_STREAMS.append(mx.default_stream(mx.default_device()))
    return _LOSS_STREAMS


@mx.custom_function
def lm_head_loss(x, w, targets, weights, softcap):
    """sum_i weights_i * CE(softcap * tanh(x_i @ w.T / softcap), targets_i), with its gradients for
    x and w, one chunk of LOSS_CHUNK rows at a time.

    Why: the (tokens, vocab) logits are the largest tensors of a step (1 GiB in float32 for 32K
    tokens), and autodiff through LM head, tanh and logsumexp keeps about a dozen of that size
    alive. Here a chunk's logits live only until its share of the gradients is taken, and
    mx.depends makes each chunk wait for the one before it on its stream, so the loss holds
    O(streams x chunk x vocab) memory. The forward computes tanh and exp once, and the gradient
    with them, which the VJP only scales. The capped logits lie in [-softcap, softcap], so
    exp(c - softcap) needs no max pass and cannot overflow; softcap 0 means no cap (a row max).
    """
    wc = w.astype(x.dtype)
    streams = loss_streams()
    done = [None] * len(streams)  # per stream: the last chunk's results, which its next chunk waits for
    dw = [mx.zeros(w.shape, dtype=mx.float32) for _ in streams]
    losses, dxs = [], []
    for i, lo in enumerate(range(0, x.shape[0], LOSS_CHUNK)):
        s = i % len(streams)
        with mx.stream(streams[s]):
            xi = x[lo:lo + LOSS_CHUNK] if done[s] is None else mx.depends(x[lo:lo + LOSS_CHUNK], done[s])
            ti, wi = targets[lo:lo + LOSS_CHUNK], weights[lo:lo + LOSS_CHUNK]
            logits = (xi @ wc.T).astype(mx.float32)
            if softcap:
                t = tanh(logits * (1 / softcap))
                c, top = softcap * t, softcap
            else:
                c, top = logits, mx.max(logits, axis=-1, keepdims=True)
            e = exp(c - top)
            denom = mx.sum(e, axis=-1, keepdims=True)
            target_c = mx.take_along_axis(c, ti[:, None], axis=-1)
            losses.append(((mx.log(denom) + top - target_c)[:, 0] * wi).sum())
            onehot = mx.arange(w.shape[0]) == ti[:, None]
            g = (e * (1 / denom) - onehot) * wi[:, None]
            g = (g * (1 - t * t) if softcap else g).astype(x.dtype)
            dxs.append(g @ wc)
            dw[s] = dw[s] + (g.T @ xi).astype(mx.float32)
            done[s] = [losses[-1], dxs[-1], dw[s]]
    return sum(losses), mx.concatenate(dxs), sum(dw)


@lm_head_loss.vjp
def _lm_head_loss_vjp(primals, cotangents, outputs):
    x, w, targets, weights, softcap = primals
    scale = cotangents[0]
    return ((scale * outputs[1]).astype(x.dtype), scale * outputs[2], mx.zeros_like(targets),
            mx.zeros_like(weights), None)


class Linear(nn.Module):
    """Bias-free linear layer, weight (out, in) in float32; computes in the input's dtype."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = mx.zeros((out_features, in_features))

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0
        assert config.n_kv_head <= config.n_head and config.n_head % config.n_kv_head == 0
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate_channels = 32
        if has_ve(layer_idx, config.n_layer):
            self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head)

    def __call__(self, x, ve, cos, sin, window):
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        # Value residual (ResFormer): mix in the value embedding with an input-dependent gate per head
        if ve is not None:
            ve = ve.reshape(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate[..., None] * ve
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        y = attention(q, k, v, window, scale=self.head_dim ** -0.5)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.c_proj(y)


@mx.custom_function
def relu2_mlp(x, w_fc, w_proj):
    """relu(x @ w_fc.T)^2 @ w_proj.T, returning the hidden pre-activation h too.

    Why: autodiff keeps h, relu(h) and relu(h)^2 for the backward, three 4x-wide tensors a layer
    (134 MiB each at 16 x 2048 tokens in float32); the VJP here keeps only h and recomputes the
    elementwise rest, which costs next to nothing beside the matmuls.
    """
    h = x @ w_fc.astype(x.dtype).T
    return mx.square(mx.maximum(h, 0)) @ w_proj.astype(x.dtype).T, h


@relu2_mlp.vjp
def _relu2_mlp_vjp(primals, cotangents, outputs):
    x, w_fc, w_proj = primals
    dy, h = cotangents[0], outputs[1]
    a = mx.maximum(h, 0)
    dw_proj = (dy.reshape(-1, dy.shape[-1]).T @ mx.square(a).reshape(-1, a.shape[-1])).astype(w_proj.dtype)
    dh = (dy @ w_proj.astype(dy.dtype)) * (2 * a)
    dw_fc = (dh.reshape(-1, dh.shape[-1]).T @ x.reshape(-1, x.shape[-1])).astype(w_fc.dtype)
    return dh @ w_fc.astype(dh.dtype), dw_fc, dw_proj


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def __call__(self, x):
        return relu2_mlp(x, self.c_fc.weight, self.c_proj.weight)[0]


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def __call__(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """Parameter names as upstream's torch model: transformer.wte.weight, transformer.h.0.attn.c_q.weight, ..."""

    def __init__(self, config, dtype=mx.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype  # compute dtype of activations and matmuls; parameters stay float32
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = {
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": [Block(config, i) for i in range(config.n_layer)],
        }
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.resid_lambdas = mx.ones((config.n_layer,))
        self.x0_lambdas = mx.zeros((config.n_layer,))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = {str(i): nn.Embedding(config.vocab_size, kv_dim)
                             for i in range(config.n_layer) if has_ve(i, config.n_layer)}
        # underscore: not a parameter
        self._cos, self._sin = self._precompute_rotary_embeddings(config.sequence_len * 10, head_dim)
        self._compiled_forward = None

    def init_weights(self):
        """Upstream's initialisation."""
        c = self.config
        s = 3 ** 0.5 * c.n_embd ** -0.5
        uniform = lambda shape: mx.random.uniform(-s, s, shape)
        self.transformer["wte"].weight = mx.random.normal(self.transformer["wte"].weight.shape)
        self.lm_head.weight = 0.001 * mx.random.normal(self.lm_head.weight.shape)
        for block in self.transformer["h"]:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                lin.weight = uniform(lin.weight.shape)
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if "ve_gate" in block.attn:  # sigmoid(0) * 2 = 1: a neutral gate
                block.attn.ve_gate.weight = mx.zeros_like(block.attn.ve_gate.weight)
        self.resid_lambdas = mx.ones((c.n_layer,))
        self.x0_lambdas = mx.full((c.n_layer,), 0.1)
        for ve in self.value_embeds.values():
            ve.weight = uniform(ve.weight.shape)
        mx.eval(self.parameters())

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000):
        inv_freq = 1.0 / (base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
        freqs = mx.arange(seq_len, dtype=mx.float32)[:, None] * inv_freq[None, :]
        return mx.cos(freqs)[None, :, None, :], mx.sin(freqs)[None, :, None, :]

    def _compute_window_sizes(self, config):
        pattern = config.window_pattern.upper()
        assert pattern and all(ch in "SL" for ch in pattern), f"window_pattern {pattern!r}: use only S and L"
        long_window, short_window = config.sequence_len, config.sequence_len // 2
        windows = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
        windows[-1] = long_window  # the last layer always sees the full context
        return windows

    def forward(self, idx, targets=None):
        B, T = idx.shape
        assert T <= self._cos.shape[1]
        cos, sin = self._cos[:, :T].astype(self.dtype), self._sin[:, :T].astype(self.dtype)
        x = norm(self.transformer["wte"](idx).astype(self.dtype))
        x0 = x
        for i, block in enumerate(self.transformer["h"]):
            x = self.resid_lambdas[i].astype(self.dtype) * x + self.x0_lambdas[i].astype(self.dtype) * x0
            ve = self.value_embeds[str(i)](idx).astype(self.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i])
        x = norm(x)
        softcap = LOGIT_SOFTCAP
        if targets is None:
            logits = self.lm_head(x).astype(mx.float32)
            return softcap * tanh(logits * (1 / softcap)) if softcap else logits
        # mean cross-entropy over targets >= 0 (-1 = ignore, as upstream), the LM head fused in
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        valid = (targets >= 0).astype(mx.float32)
        total = lm_head_loss(x, self.lm_head.weight, mx.where(targets >= 0, targets, 0), valid, softcap)[0]
        return total / mx.maximum(valid.sum(), 1)

    def __call__(self, idx, targets=None):
        if targets is None and self._compiled_forward is not None:
            return self._compiled_forward(idx)
        return self.forward(idx, targets)

    def compile_forward(self):
        """Compile model(x) -> logits, so LM head, soft-cap and the harness's loss inputs fuse at eval time."""
        self._compiled_forward = mx.compile(self.forward, inputs=self.state)

    def estimate_flops(self):
        """Estimated FLOPs per token (forward + backward), as upstream."""
        nparams = sum(p.size for _, p in tree_flatten(self.parameters()))
        exclude = (self.transformer["wte"].weight.size + sum(ve.weight.size for ve in self.value_embeds.values())
                   + self.resid_lambdas.size + self.x0_lambdas.size)
        h, t = self.config.n_head, self.config.sequence_len
        q = self.config.n_embd // h
        attn_flops = sum(12 * h * q * min(w, t) for w in self.window_sizes)
        return 6 * (nparams - exclude) + attn_flops

    def num_params(self):
        return sum(p.size for _, p in tree_flatten(self.parameters()))

    def flat_parameters(self):
        return dict(tree_flatten(self.parameters()))

    def assign(self, flat):
        """Set parameters from {dotted name: array} (mlx's tree_unflatten would turn value_embeds.1 into a list)."""
        for name, value in flat.items():
            *path, leaf = name.split(".")
            node = self
            for part in path:
                node = node[int(part)] if isinstance(node, list) else node[part]
            node[leaf] = value

# ---------------------------------------------------------------------------
# Optimizer: Muon (block matrices, grouped by shape) + AdamW (embeddings, head, scalars)
# ---------------------------------------------------------------------------

polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def orthogonalize(g, ns_steps=5, dtype=mx.float32, coeffs=None):
    """Polar Express: (stacked) matrices -> nearest semi-orthogonal matrices (singular values ~1).

    coeffs: the (steps, 3) coefficient table as an mx.array; inside mx.compile an array input keeps
    the five iterations on one fused CPU kernel instead of one per constant.
    """
    if coeffs is None:
        coeffs = mx.array(polar_express_coeffs)
    # The norm and the coefficients stay float32: Metal reduces bf16 with a bf16 accumulator, so
    # the norm comes out percents low on big matrices (singular values past 1, where the
    # polynomial diverges), and bf16 turns 8.1566 into 8.1875. Only the matmuls run in `dtype`.
    X = g.astype(mx.float32)
    X = (X / (mx.sqrt(mx.sum(X * X, axis=(-2, -1), keepdims=True)) * 1.02 + 1e-6)).astype(dtype)
    tall = g.shape[-2] > g.shape[-1]
    for i in range(ns_steps):
        a, b, c = coeffs[i, 0], coeffs[i, 1], coeffs[i, 2]
        if tall:
            A = X.swapaxes(-1, -2) @ X
            X = (a * X + X @ (b * A + c * (A @ A)).astype(dtype)).astype(dtype)
        else:
            A = X @ X.swapaxes(-1, -2)
            X = (a * X + (b * A + c * (A @ A)).astype(dtype) @ X).astype(dtype)
    return X


class MuonAdamW:
    """Muon for the block matrices, AdamW for the rest, as upstream.

    All state, hyperparameters included, lives in one flat dict of arrays (self.state) that mx.compile
    takes as input and output: hyperparameters as arrays (not Python floats) keep compiled kernels
    shared between parameter groups, and schedule values change without retracing.
    """

    def __init__(self, model, unembedding_lr, embedding_lr, matrix_lr, scalar_lr, weight_decay,
                 adam_betas, muon_dtype=mx.float32, ns_steps=5, muon_beta2=0.95):
        params = model.flat_parameters()
        dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5  # AdamW LRs scale as 1/sqrt(dmodel), tuned at 768
        print(f"Scaling AdamW LRs by 1/sqrt({model.config.n_embd}/768) = {dmodel_lr_scale:.6f}")
        adamw = {}  # name -> (lr, beta1, beta2)
        self.muon_groups = {}  # (rows, cols) -> [names], stacked and orthogonalised together
        for name, p in params.items():
            if name == "lm_head.weight":
                adamw[name] = (unembedding_lr * dmodel_lr_scale, *adam_betas)
            elif name == "transformer.wte.weight" or name.startswith("value_embeds."):
                adamw[name] = (embedding_lr * dmodel_lr_scale, *adam_betas)
            elif name == "resid_lambdas":
                adamw[name] = (scalar_lr * 0.01, *adam_betas)
            elif name == "x0_lambdas":
                adamw[name] = (scalar_lr, 0.96, 0.95)  # higher beta1 for stability, as upstream
            elif name.startswith("transformer.h."):
                self.muon_groups.setdefault(tuple(p.shape), []).append(name)
            else:
                raise ValueError(f"parameter {name} has no optimizer group: add it to MuonAdamW")
        self.adamw_names = list(adamw)
        self.muon_dtype, self.ns_steps = muon_dtype, ns_steps
        self.state = {"step": mx.array(0.0), "muon.coeffs": mx.array(polar_express_coeffs),
                      "muon.beta2": mx.array(muon_beta2), "eps": mx.array(1e-10)}
        for name, (lr, beta1, beta2) in adamw.items():
            self.state[f"adam.hp.{name}"] = mx.array([lr, beta1, beta2])
            self.state[f"adam.m.{name}"] = mx.zeros_like(params[name])
            self.state[f"adam.v.{name}"] = mx.zeros_like(params[name])
        for (rows, cols), names in self.muon_groups.items():
            key = f"{rows}x{cols}"
            self.state[f"muon.lr.{key}"] = mx.array(matrix_lr * max(1.0, rows / cols) ** 0.5)
            self.state[f"muon.momentum.{key}"] = mx.zeros((len(names), rows, cols))
            self.state[f"muon.second.{key}"] = mx.zeros((len(names), rows, 1) if rows >= cols else (len(names), 1, cols))
        mx.eval(self.state)

    def apply_gradients(self, model, grads, schedule):
        """One optimizer step. grads: {dotted name: array}; schedule: mx.array([lr_mult, muon_momentum,
        muon_weight_decay]) (mx.compile would retrace on new Python floats)."""
        lr_mult, momentum, weight_decay = schedule[0], schedule[1], schedule[2]
        params = model.flat_parameters()
        st = self.state
        step = st["step"] + 1
        st["step"] = step
        new = {}
        for name in self.adamw_names:
            hp = st[f"adam.hp.{name}"]
            lr, beta1, beta2 = hp[0], hp[1], hp[2]
            # The per-step scalars are computed once, apart from the per-element update: inside
            # mx.compile, a scalar pow that feeds an elementwise chain would be fused into it and
            # recomputed for every element. A reshape is not elementwise, so it bounds the fusion.
            step_size = (lr * lr_mult / (1 - beta1 ** step)).reshape(1)
            bias2 = (1 - beta2 ** step).reshape(1)
            p, g, m, v = params[name], grads[name], st[f"adam.m.{name}"], st[f"adam.v.{name}"]
            m = m + (1 - beta1) * (g - m)
            v = v + (1 - beta2) * (g * g - v)
            st[f"adam.m.{name}"], st[f"adam.v.{name}"] = m, v
            new[name] = p - step_size * (m / (mx.sqrt(v / bias2) + st["eps"]))
        for (rows, cols), names in self.muon_groups.items():
            key = f"{rows}x{cols}"
            g = mx.stack([grads[n] for n in names])
            p = mx.stack([params[n] for n in names])
            # Nesterov momentum
            buf = st[f"muon.momentum.{key}"]
            buf = buf + (1 - momentum) * (g - buf)
            st[f"muon.momentum.{key}"] = buf
            g = g + momentum * (buf - g)
            g = orthogonalize(g, self.ns_steps, self.muon_dtype, st["muon.coeffs"]).astype(mx.float32)
            # NorMuon: per-row (or per-column) second moment, then restore the update's total norm
            red_axis = -1 if rows >= cols else -2
            red_size = g.shape[red_axis]
            v_mean = mx.mean(g * g, axis=red_axis, keepdims=True)
            v_norm = mx.sqrt(mx.sum(v_mean, axis=(-2, -1), keepdims=True) * red_size)
            second = st[f"muon.second.{key}"]
            second = second + (1 - st["muon.beta2"]) * (v_mean - second)
            st[f"muon.second.{key}"] = second
            step_size = mx.rsqrt(mx.maximum(second, st["eps"]))
            v_norm_new = mx.sqrt(mx.sum(v_mean * red_size * step_size * step_size, axis=(-2, -1), keepdims=True))
            g = g * (step_size * (v_norm / mx.maximum(v_norm_new, st["eps"])))
            # Cautious weight decay: decay only where the update and the weight agree in sign
            lr = st[f"muon.lr.{key}"] * lr_mult
            decay_mask = (g * p) >= 0
            p = p - lr * g - lr * weight_decay * p * decay_mask
            for i, n in enumerate(names):
                new[n] = p[i]
        model.assign(new)

# ---------------------------------------------------------------------------
# Training step: forward + backward (+ optimizer on the last micro-step), compiled
# ---------------------------------------------------------------------------

def make_train_step(model, optimizer, grad_accum_steps, compile=True):
    """Returns step(batches, schedule) -> loss of the last micro-step (an evaluated mx.array).

    batches: grad_accum_steps (x, y) pairs; schedule: mx.array([lr_mult, muon_momentum, muon_weight_decay]).
    Each micro-step is evaluated before the next, so the lazy graph never spans micro-steps. The last
    micro-step runs forward, backward and the optimizer in one compiled graph.
    """
    state = [model.state, optimizer.state]

    def loss_of_params(params, x, y):
        model.assign(params)
        return model(x, y)

    value_and_grad = mx.value_and_grad(loss_of_params)

    def loss_and_grads(x, y, acc=None):
        params = model.flat_parameters()
        loss, grads = value_and_grad(params, x, y)
        model.assign(params)  # put the real parameters back (value_and_grad left its tracers in the model)
        if acc is not None:
            grads = {k: acc[k] + g for k, g in grads.items()}
        return loss, grads

    def last_micro_step(x, y, acc, schedule):
        loss, grads = loss_and_grads(x, y, acc)
        if grad_accum_steps > 1:
            grads = {k: g / grad_accum_steps for k, g in grads.items()}
        optimizer.apply_gradients(model, grads, schedule)
        return loss

    first = lambda x, y: loss_and_grads(x, y)
    middle = loss_and_grads
    last = last_micro_step
    last_only = lambda x, y, schedule: last_micro_step(x, y, None, schedule)
    if compile:
        first, middle = mx.compile(first, inputs=state), mx.compile(middle, inputs=state)
        last = mx.compile(last, inputs=state, outputs=state)
        last_only = mx.compile(last_only, inputs=state, outputs=state)

    def step(batches, schedule):
        assert len(batches) == grad_accum_steps
        if grad_accum_steps == 1:
            loss = last_only(*batches[0], schedule)
        else:
            _, acc = first(*batches[0])
            mx.eval(acc)
            for x, y in batches[1:-1]:
                _, acc = middle(x, y, acc)
                mx.eval(acc)
            loss = last(*batches[-1], acc, schedule)
        mx.eval(loss, state)
        return loss

    return step


def check_loss(loss, step):
    """Fast fail on NaN or exploding loss: a clear line and a nonzero exit."""
    if math.isnan(loss) or loss > 100:
        print(f"\nFAIL: training loss is {loss} at step {step} (NaN or exploding); aborting the run.", flush=True)
        sys.exit(1)

# ---------------------------------------------------------------------------
# Device: precision, name, peak FLOP/s for MFU, memory
# ---------------------------------------------------------------------------

def on_gpu():
    return mx.default_device() == mx.gpu


def device_name():
    try:
        name = mx.device_info().get("device_name", "")
    except Exception:  # older MLX: Metal only
        name = mx.metal.device_info().get("device_name", "") if mx.metal.is_available() else ""
    if not name and sys.platform == "linux":
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name or 'unknown'} ({'gpu' if on_gpu() else 'cpu'})"


def measured_matmul_peak(dtype=mx.float32, n=1024, reps=5):
    """FLOP/s of a square matmul on this device: the CPU 'peak' for MFU (no spec-sheet number applies)."""
    a, b = mx.random.normal((n, n)).astype(dtype), mx.random.normal((n, n)).astype(dtype)
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best

def memory_allowed():
    """memory_limit() for this device: Metal's recommended working set on a Mac, else the RAM
    available (plus what MLX holds already)."""
    info = {}
    if on_gpu():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return memory_limit(info.get("max_recommended_working_set_size"), "Metal's recommended working set",
                        in_use=mx.get_active_memory())


def step_peak(model, optimizer, rows, seq_len):
    """Peak bytes of one compiled training step of `rows` sequences of throwaway tokens (the
    caller restores the weights and the optimizer state)."""
    x = mx.zeros((rows, seq_len), dtype=mx.int32)
    mx.eval(x)
    mx.clear_cache()
    mx.reset_peak_memory()
    make_train_step(model, optimizer, 1)([(x, x)], mx.array([0.0, 0.85, 0.0], dtype=mx.float32))
    return mx.get_peak_memory()


def choose_attention(model, dtype):
    """Metal kernels where they cover the model and pass their self-test on this device (a
    compile error or a wrong value in Apple's compiler must not kill or corrupt the run), else
    MLX's attention. AUTORESEARCH_ATTENTION: auto (default) | metal | mlx. Returns the log line."""
    global USE_METAL_ATTENTION
    requested = os.environ.get("AUTORESEARCH_ATTENTION", "auto").strip().lower()
    if requested not in ("auto", "metal", "mlx"):
        sys.exit(f"AUTORESEARCH_ATTENTION={requested!r} is not one of auto, metal, mlx")
    fallback = "mx.fast.scaled_dot_product_attention"
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    windows = sorted({w for w in model.window_sizes if w < cfg.sequence_len - 1}) + [None]
    if requested == "mlx":
        why = "AUTORESEARCH_ATTENTION=mlx"
    elif metal_kernels is None or not metal_kernels.metal_available():
        why = "no Metal device"
    elif cfg.n_kv_head != cfg.n_head or not metal_kernels.has_kernel(head_dim, dtype):
        why = f"no kernel for head dim {head_dim} with {cfg.n_kv_head} of {cfg.n_head} kv heads"
    elif requested == "auto" and head_dim not in metal_kernels.PREFERRED_HEAD_DIMS:
        why = f"head dim {head_dim}: MLX's attention is expected faster; AUTORESEARCH_ATTENTION=metal takes the kernels"
    else:
        failed = metal_kernels.self_test(head_dim, dtype, windows)
        if failed is None:
            USE_METAL_ATTENTION = True
            return "Attention: metal_kernels"
        line = f"attention: metal_kernels failed self-test ({failed}); using {fallback}"
        if requested == "metal":
            sys.exit(line.replace(f"; using {fallback}", ": AUTORESEARCH_ATTENTION=metal stops here"))
        return line
    if requested == "metal":
        sys.exit(f"AUTORESEARCH_ATTENTION=metal, but {why}")
    return f"Attention: {fallback} ({why})"

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

# Model architecture
ASPECT_RATIO = 64       # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128          # target head dimension for attention
WINDOW_PATTERN = "SSSL" # sliding window pattern: L=full, S=half context
LOGIT_SOFTCAP = 15      # logits = LOGIT_SOFTCAP * tanh(logits / LOGIT_SOFTCAP); 0: no cap

# Optimization
TOTAL_BATCH_SIZE = 2**16 # ~65K tokens per optimizer step (upstream: 2**19 on an H100)
EMBEDDING_LR = 0.6      # learning rate for token embeddings (Adam)
UNEMBEDDING_LR = 0.004  # learning rate for lm_head (Adam)
MATRIX_LR = 0.04        # learning rate for matrix parameters (Muon)
SCALAR_LR = 0.5         # learning rate for per-layer scalars (Adam)
WEIGHT_DECAY = 0.2      # cautious weight decay for Muon
ADAM_BETAS = (0.8, 0.95) # Adam beta1, beta2
WARMUP_RATIO = 0.0      # fraction of time budget for LR warmup
WARMDOWN_RATIO = 0.5    # fraction of time budget for LR warmdown
FINAL_LR_FRAC = 0.0     # final LR as fraction of initial

# Model size
DEPTH = 4               # number of transformer layers (upstream: 8 on an H100)
DEVICE_BATCH_SIZE = 16  # sequences per micro-step (lowered at start-up if a step would not fit memory)
BLAS_THREADS = 0        # a CPU's BLAS threads (0: the library's default, one per core)

# The cpu profile (the default on a CPU: 75 s, 256-token rows): dim 64 and small steps. A CPU
# trains ~5K tokens/s here (the vocab-wide loss dominates), so the number of steps counts most.
# Its learning rates scale the ones above (so edits above still count): 0.15, 0.12 and 0.0625
# (the research benchmark's greedy arm at 120 s, then a higher MATRIX_LR at 75 s; bench/RESULTS.md).
if PROFILE.name == "cpu":
    ASPECT_RATIO = 16
    HEAD_DIM = 64
    TOTAL_BATCH_SIZE = 2**12
    DEVICE_BATCH_SIZE = 16
    BLAS_THREADS = 1  # dim-64 matmuls: a second BLAS thread only takes a core from the loss streams
    LOGIT_SOFTCAP = 0  # the cap's tanh was a third of the loss: ~20% more steps, no worse a step
    EMBEDDING_LR *= 0.25
    MATRIX_LR *= 3
    SCALAR_LR *= 0.125

# The smoke profile (tests only: 15 s, 256-token rows) gets a tiny model that learns nothing
if PROFILE.name == "smoke":
    DEPTH = 2
    HEAD_DIM = 64
    TOTAL_BATCH_SIZE = 2**11
    DEVICE_BATCH_SIZE = 8

# ---------------------------------------------------------------------------
# Schedules (all based on progress = training_time / time budget)
# ---------------------------------------------------------------------------

def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    elif progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    else:
        cooldown = (1.0 - progress) / WARMDOWN_RATIO
        return cooldown * 1.0 + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def build_model_config(depth, seq_len, vocab_size):
    base_dim = depth * ASPECT_RATIO
    model_dim = ((base_dim + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=WINDOW_PATTERN)

# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

def train(model, train_step, next_batches, time_budget, tokens_per_step, flops_per_token, peak):
    """Runs optimizer steps until time_budget seconds of training; returns (steps, seconds, steady MFU %)."""
    smooth_train_loss = 0.0
    total_training_time = 0.0
    step = 0
    batches, epoch = next_batches()
    while True:
        t0 = time.time()
        progress = min(total_training_time / time_budget, 1.0)
        lrm = get_lr_multiplier(progress)
        schedule = mx.array([lrm, get_muon_momentum(step), get_weight_decay(progress)], dtype=mx.float32)
        loss = train_step(batches, schedule)
        batches, epoch = next_batches()  # numpy packing: small next to a step
        train_loss = loss.item()
        check_loss(train_loss, step)
        dt = time.time() - t0
        total_training_time += dt

        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
        tok_per_sec = int(tokens_per_step / dt)
        mfu = 100 * flops_per_token * tokens_per_step / dt / peak
        remaining = max(0, time_budget - total_training_time)
        print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | "
              f"dt: {dt * 1000:.0f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.1f}% | epoch: {epoch} | "
              f"remaining: {remaining:.0f}s    ", end="", flush=True)

        # Python's GC causes long stalls; the training loop allocates few Python objects
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()
        step += 1
        if total_training_time >= time_budget:
            break
    print()
    mfu = 100 * flops_per_token * tokens_per_step * step / total_training_time / peak
    return step, total_training_time, mfu


def main():
    t_start = time.time()
    ensure_prepared()  # a clear error naming the prepare command if data or tokenizer is missing
    mx.random.seed(SEED)  # AUTORESEARCH_SEED, default 42
    compute_dtype = mx.bfloat16 if on_gpu() else mx.float32  # CPU bf16 matmul bypasses BLAS: slow
    dtype_name = "bf16" if compute_dtype == mx.bfloat16 else "fp32"
    seq_len, time_budget = PROFILE.seq_len, PROFILE.time_budget
    print(profile_line(on_gpu()))

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")
    config = build_model_config(DEPTH, seq_len, vocab_size)
    print(f"Model config: {asdict(config)}")
    model = GPT(config, dtype=compute_dtype)
    model.init_weights()
    num_params = model.num_params()
    num_flops_per_token = model.estimate_flops()
    print(f"Parameters: {num_params:,} | estimated FLOPs per token: {num_flops_per_token:e}")

    rows_per_step = TOTAL_BATCH_SIZE // seq_len
    if TOTAL_BATCH_SIZE % seq_len or rows_per_step % DEVICE_BATCH_SIZE:
        sys.exit(f"TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE * seq_len = "
                 f"{DEVICE_BATCH_SIZE} * {seq_len}: change one of them.")

    optimizer = MuonAdamW(model, unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, matrix_lr=MATRIX_LR,
                          scalar_lr=SCALAR_LR, weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS,
                          muon_dtype=compute_dtype)
    # Throwaway steps (memory fit, compile warm-up) change weights and optimizer state: restored below
    saved_params, saved_opt = model.flat_parameters(), dict(optimizer.state)
    # The micro-batch that fits this machine's memory, measured on smaller steps before any full one
    device_batch, memory_line = fit_device_batch(lambda rows: step_peak(model, optimizer, rows, seq_len),
                                                 DEVICE_BATCH_SIZE, rows_per_step, seq_len,
                                                 memory_allowed())
    print(memory_line)
    grad_accum_steps = rows_per_step // device_batch
    train_step = make_train_step(model, optimizer, grad_accum_steps)

    train_loader = make_dataloader(tokenizer, device_batch, seq_len, "train", backend="mlx")

    def next_batches():
        batches = []
        for _ in range(grad_accum_steps):
            x, y, epoch = next(train_loader)
            batches.append((x, y))
        return batches, epoch

    device = device_name()
    gpu_cores = apple_gpu_cores(getattr(mx, "device_info", dict)()) if on_gpu() else None
    peak = peak_flops(device, dtype_name, gpu_cores)
    if peak is None:
        peak = measured_matmul_peak(compute_dtype)
        print(f"Peak FLOP/s for MFU: measured {dtype_name} matmul on {device}: {peak / 1e9:.1f} GFLOP/s")
    else:
        print(f"Peak FLOP/s for MFU: {peak_source(device, dtype_name, gpu_cores)}")
    blas_line = None if on_gpu() else set_blas_threads(BLAS_THREADS)  # after the peak: MFU is of the whole CPU
    if blas_line:
        print(blas_line)
    print(choose_attention(model, compute_dtype))
    print(f"Time budget: {time_budget}s | gradient accumulation steps: {grad_accum_steps}")

    # Warm up compilation and kernel JIT on a throwaway step, then restore the initial weights
    # and optimizer state, so the timed budget measures training only.
    warm_batches, _ = next_batches()
    train_step(warm_batches, mx.array([1.0, 0.85, WEIGHT_DECAY], dtype=mx.float32))
    model.assign(saved_params)
    optimizer.state.update(saved_opt)

    t_start_training = time.time()
    num_steps, training_seconds, steady_mfu = train(
        model, train_step, next_batches, time_budget, TOTAL_BATCH_SIZE, num_flops_per_token, peak)

    model.compile_forward()
    val_bpb = evaluate_bpb(model, tokenizer, device_batch)
    t_end = time.time()

    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_seconds:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {mx.get_peak_memory() / 1024 / 1024:.1f}")
    print(f"mfu_percent:      {steady_mfu:.2f}")
    print(f"total_tokens_M:   {num_steps * TOTAL_BATCH_SIZE / 1e6:.1f}")
    print(f"num_steps:        {num_steps}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print(f"backend:          mlx")
    print(f"device:           {device}")
    for key, value in summary_fields().items():
        print(f"{key + ':':<18}{value}")


if __name__ == "__main__":
    main()
