"""The trusted scorer's protocol, end to end over a real socket pair and shared memory:
numbers equal to an independent float64 computation, and the models it must refuse."""
from __future__ import annotations

import math
import socket
import threading

import numpy as np
import pytest

from harness import scorer

V, T = 64, 32


def data(seed=0):
    rng = np.random.default_rng(seed)
    rows, hidden = rng.integers(0, V, (40, T + 1)), rng.integers(0, V, (10, T + 1))
    token_bytes = rng.integers(1, 4, V).astype(np.int32)
    token_bytes[0] = 0                         # a special token: not counted
    return rows, hidden, token_bytes


W = np.random.default_rng(1).standard_normal((V, V)).astype(np.float32)


def bigram(peek_after=None, vocab=V, nan_at=None, short=False):
    """Logits of a bigram model (causal: position t sees token t); optionally it reads the
    next token after `peek_after` calls, returns the wrong vocabulary, NaNs, or too few rows."""
    calls = [0]

    def logits_of(x):
        calls[0] += 1
        out = W[x][..., :vocab] if vocab <= V else np.concatenate([W[x], W[x][..., :vocab - V]], -1)
        if peek_after is not None and calls[0] > peek_after:
            out = out.copy()
            out[:, :-1] += 5 * np.eye(V, dtype=np.float32)[x[:, 1:]][..., :vocab]
        if nan_at is not None and calls[0] == nan_at:
            out = out.copy()
            out[0, 0, 0] = np.nan
        flat = out.reshape(-1, out.shape[-1])
        if short:
            flat = flat[:-1]
        yield out.shape, flat
    return logits_of


def evaluate(model, batch_size=8, seed=0, probes=None, rng_seed=None):
    rows, hidden, tb = data(seed)
    a, b = socket.socketpair()
    result = {}
    rng = None if rng_seed is None else np.random.default_rng(rng_seed)

    def serve():
        result.update(scorer.serve(a, lambda: (rows, hidden, tb, V, {"profile": "test"}), probes=probes, rng=rng))
        a.close()
    t = threading.Thread(target=serve)
    t.start()
    reply = scorer.evaluate_remote(b.detach(), model, batch_size)
    t.join(timeout=30)
    return reply, result


def reference_bpb(rows, tb):
    logits = W[rows[:, :-1]].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, rows[:, 1:, None], -1)[..., 0]
    nbytes = tb[rows[:, 1:]]
    return nll[nbytes > 0].sum() / (math.log(2) * nbytes.sum())


@pytest.mark.parametrize("batch_size, device", [(1, "numpy"), (8, "numpy"), (13, "numpy"), (8, "torch"), (13, "mlx")])
def test_honest_model_is_scored_exactly_like_a_float64_reference(batch_size, device, monkeypatch):
    """The same numbers whichever library does the arithmetic (torch and MLX run here on the
    CPU; on a GPU box the scorer picks torch on CUDA, on a Mac MLX on Metal)."""
    if device != "numpy":
        pytest.importorskip(device)
    monkeypatch.setenv("AUTORESEARCH_SCORER_DEVICE", device)
    reply, result = evaluate(bigram(), batch_size)
    assert result["scorer_device"].split()[0] == device
    rows, hidden, tb = data()
    assert reply["op"] == "done" and reply["val_bpb"] == result["val_bpb"]
    assert abs(result["val_bpb"] - reference_bpb(rows, tb)) < 1e-5
    assert abs(result["hidden_bpb"] - reference_bpb(hidden, tb)) < 1e-5
    assert result["eval_tokens"] == len(rows) * T and result["hidden_tokens"] == len(hidden) * T
    assert result["probes"] == scorer.MIN_PROBES and result["rows_sent"] == 50 + scorer.MIN_PROBES
    assert result["profile"] == "test" and "invalid" not in result


@pytest.mark.parametrize("device", ["numpy", "torch"])
def test_a_model_that_peeks_only_after_its_first_calls_is_refused(device, monkeypatch):
    if device != "numpy":
        pytest.importorskip(device)
    monkeypatch.setenv("AUTORESEARCH_SCORER_DEVICE", device)
    for after in (0, 2, 4):
        reply, result = evaluate(bigram(peek_after=after), batch_size=8)
        assert reply["op"] == "refused" and "reads future tokens" in result["invalid"], after
        assert "val_bpb" not in result


def test_wrong_vocabulary_non_finite_and_missing_logits_are_refused():
    for model, words in ((bigram(vocab=V + 1), "shape"), (bigram(nan_at=3), "non-finite"),
                         (bigram(short=True), "positions")):
        reply, result = evaluate(model)
        assert reply["op"] == "refused" and words in result["invalid"], (words, result)


def test_siblings_are_spread_and_sometimes_come_before_their_original():
    rng = np.random.default_rng(0)
    before, positions = 0, []
    for trial in range(20):
        items = scorer.plan_items(200, 50, T, V, np.random.default_rng(trial))
        index = {it: i for i, it in enumerate(items) if it[0] != "probe"}
        for i, it in enumerate(items):
            if it[0] == "probe":
                positions.append(i / len(items))
                before += i < index[(it[2], it[3])]
                assert 1 <= it[4] < T
    assert 0.2 < before / len(positions) < 0.8            # siblings precede their original often
    assert min(positions) < 0.2 and max(positions) > 0.8   # and are spread through the whole eval
    assert len(rng.permutation(3)) == 3


def test_a_trainer_that_never_asks_is_not_scored():
    a, b = socket.socketpair()
    b.close()
    result = scorer.serve(a, lambda: pytest.fail("rows loaded for nobody"))
    assert "never asked to be scored" in result["error"]
