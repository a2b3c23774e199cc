"""
autoresearch pretraining script, torch backend (CUDA; CPU for tests and demos).
Single device, single file. The same GPT and optimizer family as train_mlx.py
(which follows Karpathy's autoresearch train.py), scored by the same harness.

Usage: uv run train.py                          (AUTORESEARCH_PROFILE, else cpu on a CPU, standard on a GPU)
       AUTORESEARCH_PROFILE=smoke uv run train.py   (tests: a tiny model that learns nothing)
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import gc
import math
import platform
import resource
import sys
import time
from dataclasses import dataclass, asdict

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    sys.exit("train.py needs PyTorch, which is not installed in this environment. On a Linux GPU box: "
             "`uv sync --extra cuda`, then `uv run train.py`. On a Mac, use the MLX trainer: `uv run train_mlx.py`.")

from prepare import (PROFILE, Tokenizer, evaluate_bpb, fit_device_batch, make_dataloader, memory_limit, peak_flops,
                     profile_line, summary_fields)

# ---------------------------------------------------------------------------
# Attention: Flash Attention 3 when the kernel hub delivers it, else torch's own
# ---------------------------------------------------------------------------
# Window convention (shared with train_mlx.py and metal_kernels): window=W means
# query i sees key j iff i - W <= j <= i, as FA3's window_size=(W, 0). W >= T - 1
# is plain causal attention.


def load_flash_attention_3(device_capability):
    """FA3's flash_attn_interface from the `kernels` hub, or None with the reason printed.

    Never raises: a missing `kernels` package, an unreachable or offline hub, or a
    kernel that does not run on this GPU all fall back to torch attention."""
    # varunneal's FA3 build is Hopper only; kernels-community builds the others.
    repo = "varunneal/flash-attention-3" if tuple(device_capability) == (9, 0) else "kernels-community/flash-attn3"
    try:
        from kernels import get_kernel
        fa3 = get_kernel(repo).flash_attn_interface
        # Run it once: a kernel built for another architecture fails here, not mid-training.
        probe = torch.zeros(1, 128, 1, 64, device="cuda", dtype=torch.bfloat16)
        fa3.flash_attn_func(probe, probe, probe, causal=True, window_size=(64, 0))
        return fa3
    except Exception as exc:  # noqa: BLE001 -- any failure here means "use the fallback"
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        print(f"Flash Attention 3 unavailable ({type(exc).__name__}: {reason}); using torch attention")
        return None


def sliding_window_mask(T, window, device):
    """(T, T) boolean mask, True where query i may attend to key j."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (j >= i - window)


def sdpa_attention(q, k, v, window):
    """q, k, v: (B, T, H, D) -> (B, T, H, D) with torch SDPA."""
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    enable_gqa = k.size(1) != q.size(1)
    if window is None or window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    else:
        mask = sliding_window_mask(T, window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    return y.transpose(1, 2)


_flex_block_masks = {}


def flex_block_mask(window, T, device):
    """The cached block mask of a causal left window W (W >= T: plain causal). main() builds
    them before torch.compile, so the compiled graph only reads them."""
    from torch.nn.attention.flex_attention import create_block_mask
    W = T if window is None else min(window, T)
    key = (W, T, str(device))
    if key not in _flex_block_masks:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= W)
        _flex_block_masks[key] = create_block_mask(mask_mod, None, None, T, T, device=device)
    return _flex_block_masks[key]


def flex_attention(q, k, v, window):
    """q, k, v: (B, T, H, D) -> (B, T, H, D) with flex attention: the block mask skips
    the tiles outside the window, so short-window layers cost what they should."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    block_mask = flex_block_mask(window, q.size(1), q.device)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = flex(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2)


ATTENTION_KIND = "sdpa"  # "fa3" | "flex" | "sdpa"; set by choose_attention() in main()
FA3 = None               # FA3's flash_attn_interface when loaded


def attention(q, k, v, window):
    """Causal attention with a left window; q, k, v: (B, T, H, D) -> (B, T, H, D)."""
    if ATTENTION_KIND == "fa3":
        w = -1 if window is None or window >= q.size(1) - 1 else window
        y = FA3.flash_attn_func(q, k, v, causal=True, window_size=(w, 0))
        return y[0] if isinstance(y, tuple) else y  # some FA3 builds also return the log-sum-exp
    if ATTENTION_KIND == "flex":
        return flex_attention(q, k, v, window)
    return sdpa_attention(q, k, v, window)


def choose_attention(device, requested="auto"):
    """Pick and install the attention implementation; returns its name.
    requested: auto | fa3 | flex | sdpa (env AUTORESEARCH_ATTENTION)."""
    if requested not in ("auto", "fa3", "flex", "sdpa"):
        raise SystemExit(f"AUTORESEARCH_ATTENTION={requested!r} is not one of auto, fa3, flex, sdpa")
    if requested == "flex" and device.type != "cuda":
        raise SystemExit(f"AUTORESEARCH_ATTENTION=flex needs a CUDA GPU (flex attention has no backward on "
                         f"{device.type}); use auto or sdpa")
    global ATTENTION_KIND, FA3
    kind = "sdpa"
    if device.type == "cuda" and requested in ("auto", "fa3"):
        FA3 = load_flash_attention_3(torch.cuda.get_device_capability(device))
        if FA3 is not None:
            kind = "fa3"
    if kind == "sdpa" and device.type == "cuda" and requested in ("auto", "fa3", "flex"):
        kind = "flex"  # compiled with the model; SDPA with a dense mask would compute every tile
    ATTENTION_KIND = kind
    return kind

# ---------------------------------------------------------------------------
# GPT model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    # x: (B, T, H, D); rotates the two halves of the head dimension (not interleaved pairs).
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], 3)


def window_sizes_for(config):
    """Per-layer left window: "S" = sequence_len // 2, "L" = sequence_len; the last layer is L."""
    pattern = config.window_pattern.upper()
    if not pattern or any(c not in "SL" for c in pattern):
        raise ValueError(f"window_pattern {config.window_pattern!r} must be made of S and L")
    long_window, short_window = config.sequence_len, config.sequence_len // 2
    windows = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
    windows[-1] = long_window
    return windows


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # Value residual (ResFormer): mix in the value embedding through a per-head gate in (0, 2)
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        y = attention(q, k, v, window)
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        x = x + self.mlp(norm(x))
        return x


LOSS_CHUNK = 2048  # rows of logits alive at a time: 2048 x 8192 float32 = 64 MiB


class LMHeadLoss(torch.autograd.Function):
    """sum over targets >= 0 of CE(softcap * tanh(x @ weight.T / softcap), target), with its
    gradients for x and weight, one chunk of LOSS_CHUNK rows at a time.

    Why: the (tokens, vocab) logits are the largest tensors of a step (8.6 GB in float32 for
    the 262K tokens of a CUDA micro-batch), and autograd through LM head, tanh and cross-entropy
    keeps several of that size alive. Here a chunk's logits live only until its share of the
    gradients is taken, so the loss holds O(chunk x vocab) memory. The capped logits lie in
    [-softcap, softcap], so exp(c - softcap) needs no max pass and cannot overflow; softcap 0
    means no cap (a row max).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, softcap):
        w = weight.to(x.dtype)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        dx, dw = torch.empty_like(x), torch.zeros_like(weight, dtype=torch.float32)
        for lo in range(0, x.size(0), LOSS_CHUNK):
            xi, ti = x[lo:lo + LOSS_CHUNK], targets[lo:lo + LOSS_CHUNK]
            valid = (ti >= 0).float()
            ti = ti.clamp(min=0)
            logits = (xi @ w.T).float()
            if softcap:
                t = torch.tanh(logits / softcap)
                c, top = softcap * t, softcap
            else:
                c, top = logits, logits.amax(-1, keepdim=True)
            g = torch.exp(c - top)
            denom = g.sum(-1, keepdim=True)
            total += ((denom.log() + top - c.gather(1, ti[:, None]))[:, 0] * valid).sum()
            g.div_(denom)
            g.scatter_add_(1, ti[:, None], -torch.ones_like(g[:, :1]))
            if softcap:
                g.mul_(1 - t * t)
            g.mul_(valid[:, None])
            g = g.to(x.dtype)
            dx[lo:lo + LOSS_CHUNK] = g @ w
            dw += (g.T @ xi).float()
        ctx.save_for_backward(dx, dw)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dx, dw = ctx.saved_tensors
        return (grad_total * dx).to(dx.dtype), grad_total * dw, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = window_sizes_for(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        # float32 tables; the forward casts them to the activation dtype (bf16 under autocast)
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform with the std of N(0, 1/n_embd)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                torch.nn.init.uniform_(linear.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)  # gate 2*sigmoid(0) = 1: neutral
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        # buffers are not initialized by to_empty(): recompute them on the model's device
        cos, sin = self._rotary_tables(self.rotary_seq_len, self.config.n_embd // self.config.n_head)
        self.cos, self.sin = cos, sin

    def embeddings_to_bf16(self):
        """On CUDA the embedding tables live in bf16 (half the memory, as upstream)."""
        self.transformer.wte.to(dtype=torch.bfloat16)
        for ve in self.value_embeds.values():
            ve.to(dtype=torch.bfloat16)

    def _rotary_tables(self, seq_len, head_dim, base=10000):
        device = self.transformer.wte.weight.device
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def estimate_flops(self):
        """Model FLOPs per token (forward + backward): 6 per matmul weight plus attention."""
        nparams = sum(p.numel() for p in self.parameters())
        embedding_numel = self.transformer.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
        nparams_matmul = nparams - embedding_numel - self.resid_lambdas.numel() - self.x0_lambdas.numel()
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * q * min(w, t) for w in self.window_sizes)
        return 6 * nparams_matmul + attn_flops

    def num_scaling_params(self):
        counts = {
            "wte": sum(p.numel() for p in self.transformer.wte.parameters()),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": sum(p.numel() for p in self.lm_head.parameters()),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        return counts

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                        weight_decay=0.0, adam_betas=(0.8, 0.95), scalar_lr=0.5, compile=False):
        model_dim = self.config.n_embd
        matrix_params = list(self.transformer.h.parameters())
        # AdamW learning rates scale as 1/sqrt(d_model) (tuned at 768)
        dmodel_lr_scale = (model_dim / 768) ** -0.5
        print(f"Scaling AdamW LRs by 1/sqrt({model_dim}/768) = {dmodel_lr_scale:.6f}")
        adamw = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        param_groups = [
            dict(adamw, params=list(self.lm_head.parameters()), lr=unembedding_lr * dmodel_lr_scale),
            dict(adamw, params=list(self.transformer.wte.parameters()), lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=list(self.value_embeds.parameters()), lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        for shape in sorted({p.shape for p in matrix_params}):
            param_groups.append(dict(
                kind="muon", params=[p for p in matrix_params if p.shape == shape], lr=matrix_lr,
                momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay,
            ))
        assert sum(len(g["params"]) for g in param_groups) == len(list(self.parameters()))
        optimizer = MuonAdamW(param_groups, compile=compile)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None):
        """Logits (B, T, vocab) in float32, soft-capped; the mean loss when targets are given."""
        B, T = idx.size()
        assert T <= self.cos.size(1), f"sequence of {T} tokens is longer than the rotary table"
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])
        x = norm(x)
        softcap = LOGIT_SOFTCAP
        if targets is None:
            logits = self.lm_head(x).float()
            return softcap * torch.tanh(logits / softcap) if softcap else logits
        # mean cross-entropy over targets >= 0 (-1 = ignore, as upstream), the LM head fused in
        targets = targets.reshape(-1)
        total = LMHeadLoss.apply(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets, softcap)
        return total / (targets >= 0).sum().clamp(min=1)

# ---------------------------------------------------------------------------
# Optimizer: Muon (polar express, NorMuon, cautious weight decay) for the block
# matrices, AdamW for embeddings, LM head and scalars
# ---------------------------------------------------------------------------

polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p.add_(exp_avg / denom * (-lr_t / bias1))


def muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
              momentum_t, lr_t, wd_t, beta2_t, ns_steps, red_dim, ortho_dtype):
    # Nesterov momentum
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    # Polar express: drive the singular values of the update towards 1
    # normalise in float32: a bf16 norm a few percent low would leave singular values above 1,
    # where the polynomial diverges; the loop below stays in ortho_dtype (bf16 tensor cores)
    X = g.float()
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)).to(ortho_dtype)
    tall = g.size(-2) > g.size(-1)
    for a, b, c in polar_express_coeffs[:ns_steps]:
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    g = X
    # NorMuon: per-row (or per-column) second moment, renormalized to keep the update norm
    beta2 = beta2_t.to(g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled_sq_sum = (v_mean * red_dim_size) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # Cautious weight decay: decay only where the update agrees in sign with the weight
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups of kind "muon" (stacked by shape), AdamW for kind "adamw"."""

    def __init__(self, param_groups, compile=False):
        super().__init__(param_groups, defaults={})
        # 0-D CPU tensors for the hyperparameters: changing them never recompiles
        scalar = lambda: torch.tensor(0.0, dtype=torch.float32, device="cpu")  # noqa: E731
        self._adamw_t = {k: scalar() for k in ("step", "lr", "beta1", "beta2", "eps", "wd")}
        self._muon_t = {k: scalar() for k in ("momentum", "lr", "wd", "beta2")}
        compiled = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if compile else (lambda f: f)
        self._adamw_step, self._muon_step = compiled(adamw_step), compiled(muon_step)

    def _step_adamw(self, group):
        t = self._adamw_t
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t["step"].fill_(state["step"])
            t["lr"].fill_(group["lr"])
            t["beta1"].fill_(group["betas"][0])
            t["beta2"].fill_(group["betas"][1])
            t["eps"].fill_(group["eps"])
            t["wd"].fill_(group["weight_decay"])
            self._adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                             t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"])

    def _step_muon(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        p = params[0]
        state = self.state[p]
        shape = p.shape
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(len(params), *shape, dtype=p.dtype, device=p.device)
            state_shape = (len(params), shape[-2], 1) if shape[-2] >= shape[-1] else (len(params), 1, shape[-1])
            state["second_momentum_buffer"] = torch.zeros(state_shape, dtype=p.dtype, device=p.device)
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        stacked_grads = torch.stack([q.grad for q in params])
        stacked_params = torch.stack(params)
        t = self._muon_t
        t["momentum"].fill_(group["momentum"])
        t["beta2"].fill_(group["beta2"] if group["beta2"] is not None else 0.0)
        t["lr"].fill_(group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5)
        t["wd"].fill_(group["weight_decay"])
        # bf16 Newton-Schulz on CUDA tensor cores; float32 elsewhere (CPU bf16 matmul is slow)
        ortho_dtype = torch.bfloat16 if p.device.type == "cuda" else torch.float32
        self._muon_step(stacked_grads, stacked_params, state["momentum_buffer"], state["second_momentum_buffer"],
                        t["momentum"], t["lr"], t["wd"], t["beta2"], group["ns_steps"], red_dim, ortho_dtype)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            elif group["kind"] == "muon":
                self._step_muon(group)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

# Model architecture
ASPECT_RATIO = 64       # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128          # target head dimension for attention
WINDOW_PATTERN = "SSSL" # sliding window pattern: L = full context, S = half context
LOGIT_SOFTCAP = 15      # logits = LOGIT_SOFTCAP * tanh(logits / LOGIT_SOFTCAP); 0: no cap

# Optimization
TOTAL_BATCH_SIZE = 2**19 # ~524K tokens per optimizer step
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
DEPTH = 8               # number of transformer layers
DEVICE_BATCH_SIZE = 128 # per-device batch size (lowered at start-up if a step would not fit memory)

if PROFILE.name == "cpu":
    # The default on a CPU (75 s, 256-token rows): train_mlx.py's small uncapped model, small
    # steps and learning rates, which learn there.
    DEPTH, ASPECT_RATIO, HEAD_DIM = 4, 16, 64
    DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 16, 2**12
    LOGIT_SOFTCAP = 0
    EMBEDDING_LR *= 0.25
    MATRIX_LR *= 3
    SCALAR_LR *= 0.125

if PROFILE.name == "smoke":
    # Tests only: a tiny model that takes a few steps in the smoke budget and learns nothing.
    DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 32, 32
    DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 8, 8 * PROFILE.seq_len

# ---------------------------------------------------------------------------
# Setup and training loop (run as a script only: tests import the model above)
# ---------------------------------------------------------------------------


def pick_device():
    """AUTORESEARCH_DEVICE (cuda | mps | cpu) if set, else CUDA, then MPS, then CPU."""
    name = os.environ.get("AUTORESEARCH_DEVICE", "").strip().lower()
    if name:
        if name not in ("cuda", "mps", "cpu"):
            raise SystemExit(f"AUTORESEARCH_DEVICE={name!r}: use cuda, mps or cpu")
        if name == "cuda" and not torch.cuda.is_available():
            raise SystemExit("AUTORESEARCH_DEVICE=cuda but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); install the CUDA build: uv sync --extra cuda")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return platform.processor() or "Apple GPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_peak(device, dtype, n=1024, seconds=0.5):
    """FLOP/s of a square matmul on this device: the MFU denominator when no table entry exists."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (thread pools, kernel selection)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device):
    """CUDA: the caching allocator's peak. Elsewhere: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024 / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def step_peak(model, optimizer, rows, seq_len, device, autocast_ctx):
    """Peak bytes of one eager training step of `rows` sequences of throwaway tokens (the caller
    restores the weights and the optimizer state). CUDA: the allocator's peak. A CPU: the
    process's peak resident set, which never goes down, so it is read after larger steps only."""
    x = torch.zeros((rows, seq_len), dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with autocast_ctx:
        loss = model(x, x)
    loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    sync(device)
    return peak_memory_mb(device) * 2 ** 20


def build_model_config(depth, vocab_size, seq_len):
    base_dim = depth * ASPECT_RATIO
    model_dim = ((base_dim + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    return GPTConfig(
        sequence_len=seq_len, vocab_size=vocab_size,
        n_layer=depth, n_head=num_heads, n_kv_head=num_heads, n_embd=model_dim,
        window_pattern=WINDOW_PATTERN,
    )


def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    elif progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown * 1.0 + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def check_loss(loss, step):
    """Fast fail: a NaN or exploding loss will not recover within the budget."""
    if math.isnan(loss) or loss > 100:
        print(f"\nFAIL: training loss is {loss} at step {step}; aborting the run")
        sys.exit(1)


def main():
    t_start = time.time()
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    torch.manual_seed(seed)
    torch.set_float32_matmul_precision("high")
    device = pick_device()
    on_cuda = device.type == "cuda"
    seq_len = PROFILE.seq_len
    # The bench's short GPU check shortens the budget; the summary's training_seconds shows it.
    time_budget = float(os.environ.get("AUTORESEARCH_TIME_BUDGET", PROFILE.time_budget))
    # bf16 autocast on CUDA (tensor cores); float32 elsewhere, so CPU runs match train_mlx.py
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_cuda)
    compute_dtype = "bf16" if on_cuda else "fp32"

    attention_kind = choose_attention(device, os.environ.get("AUTORESEARCH_ATTENTION", "auto").strip().lower())
    print(f"Device: {device_description(device)} ({device.type}), attention: {attention_kind}, "
          f"profile: {PROFILE.name}, seed: {seed}")
    print(profile_line(device.type != "cpu"))

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")

    config = build_model_config(DEPTH, vocab_size, seq_len)
    print(f"Model config: {asdict(config)}")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if on_cuda:
        model.embeddings_to_bf16()

    param_counts = model.num_scaling_params()
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    num_params = param_counts["total"]
    num_flops_per_token = model.estimate_flops()
    print(f"Estimated FLOPs per token: {num_flops_per_token:e}")

    device_peak = peak_flops(device_description(device), compute_dtype)
    if device_peak is None:
        device_peak = measure_matmul_peak(device, torch.bfloat16 if on_cuda else torch.float32)
        print(f"Device peak: {device_peak / 1e9:.1f} GFLOP/s {compute_dtype} (measured matmul)")
    else:
        print(f"Device peak: {device_peak / 1e12:.1f} TFLOP/s {compute_dtype} (table)")

    rows_per_step = TOTAL_BATCH_SIZE // seq_len
    if TOTAL_BATCH_SIZE % seq_len or rows_per_step % DEVICE_BATCH_SIZE:
        sys.exit(f"TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE * seq_len = "
                 f"{DEVICE_BATCH_SIZE} * {seq_len}: change one of them.")

    optimizer = model.setup_optimizer(
        unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, scalar_lr=SCALAR_LR,
        adam_betas=ADAM_BETAS, matrix_lr=MATRIX_LR, weight_decay=WEIGHT_DECAY, compile=on_cuda,
    )
    # The micro-batch that fits this machine's memory, measured on smaller eager steps first;
    # then the weights and optimizer state those throwaway steps changed are put back
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ours = torch.cuda.memory_reserved(device) + torch.cuda.mem_get_info(device)[0] if on_cuda else None
    device_batch, memory_line = fit_device_batch(
        lambda rows: step_peak(model, optimizer, rows, seq_len, device, autocast_ctx),
        DEVICE_BATCH_SIZE, rows_per_step, seq_len,
        memory_limit(ours, "free CUDA memory", in_use=peak_memory_mb(device) * 2 ** 20))
    model.load_state_dict(initial)
    optimizer.state.clear()
    del initial
    print(memory_line)
    grad_accum_steps = rows_per_step // device_batch
    if attention_kind == "flex":
        for window in set(model.window_sizes):
            flex_block_mask(window, seq_len, device)
    # Compile on CUDA only: on a CPU the compile takes longer than the smoke budget saves.
    train_model = torch.compile(model, dynamic=False) if on_cuda else model

    train_loader = make_dataloader(tokenizer, device_batch, seq_len, "train", backend="torch", device=device)
    x, y, epoch = next(train_loader)

    print(f"Time budget: {time_budget:g}s")
    print(f"Gradient accumulation steps: {grad_accum_steps}")

    # Steps left out of training_seconds: on CUDA the first ones compile the model.
    untimed_steps = 10 if on_cuda else 0
    t_start_training = time.time()
    print(f"Start-up: {t_start_training - t_start:.1f}s")
    smooth_train_loss = 0
    total_training_time = 0
    step = 0
    while True:
        sync(device)
        t0 = time.time()
        for micro_step in range(grad_accum_steps):
            with autocast_ctx:
                loss = train_model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)

        progress = min(total_training_time / time_budget, 1.0)
        lrm = get_lr_multiplier(progress)
        muon_momentum = get_muon_momentum(step)
        muon_weight_decay = get_weight_decay(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay
        optimizer.step()
        model.zero_grad(set_to_none=True)

        train_loss_f = train_loss.item()
        check_loss(train_loss_f, step)

        sync(device)
        dt = time.time() - t0
        if step >= untimed_steps:
            total_training_time += dt

        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
        tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
        mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / device_peak
        remaining = max(0, time_budget - total_training_time)
        print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | "
              f"dt: {dt * 1000:.0f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.1f}% | epoch: {epoch} | "
              f"remaining: {remaining:.0f}s    ", end="", flush=True)

        # Python's GC causes stalls of ~500 ms: collect once, then freeze
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()

        step += 1
        if step > untimed_steps and total_training_time >= time_budget:
            break

    print()
    total_tokens = step * TOTAL_BATCH_SIZE

    model.eval()
    t_eval = time.time()
    with torch.no_grad(), autocast_ctx:
        val_bpb = evaluate_bpb(train_model, tokenizer, device_batch)
    print(f"Evaluation: {time.time() - t_eval:.1f}s")

    t_end = time.time()
    timed_steps = step - untimed_steps
    if total_training_time > 0:
        print(f"Throughput: {TOTAL_BATCH_SIZE * timed_steps / total_training_time:,.0f} tokens/s over {timed_steps} timed steps")
    steady_state_mfu = (100 * num_flops_per_token * TOTAL_BATCH_SIZE * timed_steps / total_training_time / device_peak
                        if total_training_time > 0 else 0.0)
    fields = summary_fields()
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {total_training_time:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_memory_mb(device):.1f}")
    print(f"mfu_percent:      {steady_state_mfu:.2f}")
    print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print(f"backend:          cuda")
    print(f"device:           {device_description(device)} ({device.type})")
    print(f"dataset:          {fields['dataset']}")
    print(f"profile:          {fields['profile']}")
    print(f"eval_tokens:      {fields['eval_tokens']}")
    print(f"unigram_bpb:      {fields['unigram_bpb']}")


if __name__ == "__main__":
    main()
