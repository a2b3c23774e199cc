"""Evaluation integrity: the harness's causality/shape/finiteness check, the hidden slice, and
the runner refusing summaries that do not match what the trusted scorer computed.

Harness checks use real MLX and torch models; loop checks use real git repositories in temp
dirs with stand-in trainers run as real subprocesses (on the fake harness, and on the real
prepare.py with the builtin data)."""
from __future__ import annotations

import os
from pathlib import Path

import git
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import prepare
from autoresearch.integrity import check_summary, scored_fields
from autoresearch.policy import Decisions
from autoresearch.runner import RunConfig, Runner, run
from autoresearch.trainer import Trainer
from loop_fixtures.helpers import ScriptedAgent, ledger_records, make_repo, real_harness_repo

HERE = Path(__file__).parent
V = 64


class Causal(nn.Module):
    """Embedding -> causal running mean -> linear head: position t sees tokens 0..t only."""
    def __init__(self, vocab=V, dim=8, peek=0, wrong_vocab=False, nan=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab + (1 if wrong_vocab else 0))
        self.peek, self.nan = peek, nan

    def __call__(self, x):
        h = self.emb(x)
        T = h.shape[1]
        h = mx.cumsum(h, axis=1) / mx.arange(1, T + 1, dtype=h.dtype)[None, :, None]
        if self.peek:   # position t also sees token t + peek
            later = mx.concatenate([h[:, self.peek:], h[:, -self.peek:]], axis=1)
            h = h + later
        out = self.head(h)
        return out * mx.nan if self.nan else out


def tokens(B=4, T=32, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def test_causality_check_accepts_causal_and_rejects_peeking_models():
    mx.random.seed(0)
    assert prepare.check_causality(Causal(), tokens(), V) is None
    reason = prepare.check_causality(Causal(peek=1), tokens(), V)
    assert reason and "reads future tokens" in reason
    reason = prepare.check_causality(Causal(peek=7), tokens(B=8, T=64), V)
    assert reason and "not causal" in reason
    assert "shape" in prepare.check_causality(Causal(wrong_vocab=True), tokens(), V)
    assert "non-finite" in prepare.check_causality(Causal(nan=True), tokens(), V)
    assert prepare.check_causality(Causal(), tokens(B=1, T=2), V) is None


def test_causality_check_torch():
    torch = pytest.importorskip("torch")

    class TorchModel(torch.nn.Module):
        def __init__(self, peek):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(V, 8)
            self.head = torch.nn.Linear(8, V)
            self.peek = peek

        def forward(self, x):
            h = self.emb(x).cumsum(1)
            if self.peek:
                h = h + torch.roll(h, -1, dims=1)
            return self.head(h)

    assert prepare.check_causality(TorchModel(False), tokens(), V) is None
    assert "not causal" in prepare.check_causality(TorchModel(True), tokens(), V)


def test_evaluate_bpb_refuses_a_peeking_model_in_process(builtin_cache, monkeypatch):
    for k, v in builtin_cache.items():
        monkeypatch.setenv(k, v)
    import importlib
    p = importlib.reload(prepare)
    try:
        tok = p.Tokenizer.from_directory()
        vocab = tok.get_vocab_size()
        mx.random.seed(0)
        bpb = p.evaluate_bpb(Causal(vocab=vocab), tok, 16)
        assert np.isfinite(bpb) and p.summary_fields()["eval_tokens"] == 64 * 256
        # the hidden slice: rows after the scored ones, none shared
        main, hidden = p.eval_rows(tok), p.hidden_rows(tok)
        assert len(hidden) == int(p.PROFILE.eval_tokens * p.HIDDEN_EVAL_FRACTION) // p.PROFILE.seq_len
        seen = {r.tobytes() for r in main}
        assert not any(r.tobytes() in seen for r in hidden)
        # a model that reads the next token: refused before scoring
        with pytest.raises(p.IntegrityError, match="reads future tokens"):
            p.evaluate_bpb(Causal(vocab=vocab, peek=1), tok, 16)
    finally:
        for k in builtin_cache:
            monkeypatch.delenv(k)
        importlib.reload(prepare)


def test_check_summary_rules():
    harness = {"profile": "smoke", "dataset": "builtin"}
    s = {"val_bpb": 1.234567, "profile": "smoke", "dataset": "builtin", "eval_tokens": 16384}
    good = {"val_bpb": 1.2345671, "eval_tokens": 16384, "profile": "smoke", "dataset": "builtin",
            "hidden_bpb": 1.3, "hidden_tokens": 4096, "probes": 8}
    assert check_summary(s, harness, good, None, True) is None
    assert scored_fields(good) == {"hidden_bpb": 1.3, "hidden_tokens": 4096, "probes": 8}
    assert "eval_tokens 8192" in check_summary({**s, "eval_tokens": 8192}, harness, good, None, True)
    assert "profile" in check_summary({**s, "profile": "quick"}, harness, good, None, True)
    assert "is not the scorer's 1.234567" in check_summary({**s, "val_bpb": 1.0}, harness, good, None, True)
    assert "not computed by the trusted scorer" in check_summary(s, harness, None, None, True)
    assert "scorer: reads future" in check_summary(s, harness, {"invalid": "reads future tokens"}, None, True)
    assert "ran with dataset" in check_summary(s, harness, {**good, "dataset": "climbmix"}, None, True)
    # a harness without the scorer: the eval size is checked against the run's
    assert check_summary(s, harness, None, 16384, False) is None
    assert "scores 16384 tokens" in check_summary({**s, "eval_tokens": 8192}, harness, None, 16384, False)


# -- the runner --------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("AUTORESEARCH_", "FAKE_", "ANTHROPIC_")):
            monkeypatch.delenv(k)


def run_loop(d, edits, rule="greedy"):
    config = RunConfig(tag="t", backend="mlx", max_experiments=len(edits), max_fix_attempts=0)
    runner = Runner(d, config, ScriptedAgent(edits), Trainer.for_backend("mlx"), out=lambda s: None,
                    sleep=lambda s: None, decisions=Decisions(rule))
    assert run(runner, resume=False) == 0
    return ledger_records(d, "result")


def test_summary_with_a_smaller_eval_is_rejected(tmp_path):
    """The fake harness scores 16384 tokens; a trainer that prints half (with a better val_bpb)
    is invalid, never kept."""
    d = tmp_path / "p"
    make_repo(d)
    results = run_loop(d, [
        ("half the eval", lambda t: t.replace("{fields['eval_tokens']}", "{fields['eval_tokens'] // 2}")
         .replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.06")),
        ("another profile", lambda t: t.replace("{fields['profile']}", "quick").replace("MATRIX_LR = 0.04",
                                                                                          "MATRIX_LR = 0.06")),
        ("honest", lambda t: t.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.06"))])
    assert [r["status"] for r in results] == ["keep", "invalid", "invalid", "keep"]
    assert "eval_tokens 8192" in results[1]["description"] and "16384" in results[1]["description"]
    assert "profile 'quick'" in results[2]["description"]
    assert git.Repo(d).head.commit.hexsha == results[3]["commit"]


def test_peeking_model_and_hand_written_score_are_invalid_on_the_real_harness(tmp_path, builtin_cache, monkeypatch):
    for k, v in builtin_cache.items():
        monkeypatch.setenv(k, v)
    d = real_harness_repo(tmp_path)
    results = run_loop(d, [("peek at the next token", lambda t: t.replace("PEEK = 0.0", "PEEK = 30.0")),
                           ("print a better number", lambda t: t.replace("HAND_WRITTEN_BPB = 0.0",
                                                                          "HAND_WRITTEN_BPB = 0.5"))])
    base, peek, forged = results
    assert base["status"] == "keep" and base["hidden_bpb"] > 0 and base["hidden_tokens"] > 0
    assert peek["status"] == "invalid" and "reads future tokens" in peek["description"]
    assert forged["status"] == "invalid" and "is not the scorer's" in forged["description"]
    assert forged["val_bpb"] == base["val_bpb"]     # the logged number is the scorer's, not the forged one
    assert git.Repo(d).head.commit.hexsha == base["commit"]
