"""A stand-in trainer on the REAL harness: a tiny untrained MLX model scored by
prepare.evaluate_bpb on the prepared data, then the upstream summary block.

The constants are what a cheating edit would change: PEEK adds the next input token to
each position's logits (reads the future; from the first call on, or only after
PEEK_AFTER_CALLS honest calls), HAND_WRITTEN_BPB prints a number instead of the harness's.
TEMPERATURE scales the logits (0: uniform, an honest gain over the random init).
"""
PEEK = 0.0
PEEK_AFTER_CALLS = 0
HAND_WRITTEN_BPB = 0.0
TEMPERATURE = 1.0
EVAL_BATCH = 8

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

import prepare  # noqa: E402


class Tiny(nn.Module):
    def __init__(self, vocab, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.vocab = vocab
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        logits = self.head(self.emb(x)) * TEMPERATURE
        if PEEK or (PEEK_AFTER_CALLS and self.calls > PEEK_AFTER_CALLS):
            nxt = mx.concatenate([x[:, 1:], x[:, -1:]], axis=1)       # the token at t+1 = the target
            logits = logits + (PEEK or 30.0) * (mx.arange(self.vocab)[None, None, :] == nxt[..., None])
        return logits


if __name__ == "__main__":
    prepare.ensure_prepared()
    mx.random.seed(prepare.SEED)
    tok = prepare.Tokenizer.from_directory()
    model = Tiny(tok.get_vocab_size())
    val = prepare.evaluate_bpb(model, tok, EVAL_BATCH)
    if HAND_WRITTEN_BPB:
        val = HAND_WRITTEN_BPB
    print("---")
    print(f"val_bpb:          {val:.6f}")
    print("training_seconds: 0.0")
    print("peak_vram_mb:     1.0")
    print("num_steps:        0")
    print("backend:          mlx")
    for key, value in prepare.summary_fields().items():
        print(f"{key + ':':<18}{value}")
