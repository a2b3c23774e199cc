"""Runner-side evaluation integrity: the trainer prints its own summary, so the runner checks
it against the trusted scorer's result.

Under the runner, `prepare.evaluate_bpb` in the (sandboxed) trainer only hands logits to the
scorer (harness/scorer.py, a runner-owned process that never runs the training file); the
scorer computes val_bpb, the hidden slice and the causality verdict, and the runner reads
them from a pipe the trainer cannot reach. The runner refuses a result when

  - the scorer refused the model (logits not (B, T, vocab), not finite, or logits before
    position t change when tokens from t on change: the model reads the future), or never
    scored it (evaluate_bpb was not called, or replaced);
  - the summary's profile or dataset is not the run's;
  - the summary's val_bpb or eval_tokens are not the scorer's.

A target whose prepare.py has no scorer support (a fake harness in tests) is checked on its
summary alone: profile, dataset and the eval size the run must have.
"""
from __future__ import annotations

import math

VAL_TOLERANCE = 1e-6   # the summary prints val_bpb with 6 decimals


def check_summary(summary: dict, harness: dict, scored: dict | None, expected_eval_tokens: int | None,
                  scorer_required: bool) -> str | None:
    """Why this summary must not be scored, or None. `harness` is the run's harness info
    (profile, dataset); `expected_eval_tokens` the token count this run's eval must have."""
    if scored and scored.get("invalid"):
        return f"scorer: {scored['invalid']}"
    for key in ("profile", "dataset"):
        want, got = harness.get(key), summary.get(key)
        if want is not None and got != want:
            return f"the summary says {key} {got!r} but the run's {key} is {want!r}"
    got_tokens = summary.get("eval_tokens")
    if not scorer_required:
        if expected_eval_tokens is not None and got_tokens != expected_eval_tokens:
            return (f"the summary says eval_tokens {got_tokens} but this run's evaluation scores "
                    f"{expected_eval_tokens} tokens")
        return None
    if not scored or not isinstance(scored.get("val_bpb"), float):
        why = (scored or {}).get("error") or "evaluate_bpb never handed the scorer its logits"
        return f"val_bpb was not computed by the trusted scorer ({why})"
    val = summary.get("val_bpb")
    if not (isinstance(val, float) and math.isfinite(val) and abs(scored["val_bpb"] - val) <= VAL_TOLERANCE):
        return f"the summary's val_bpb {val} is not the scorer's {scored['val_bpb']:.6f}"
    for key in ("profile", "dataset"):
        if harness.get(key) is not None and scored.get(key) != harness.get(key):
            return f"the scorer ran with {key} {scored.get(key)!r}, not the run's {harness.get(key)!r}"
    if scored.get("eval_tokens") != got_tokens:
        return f"the summary says eval_tokens {got_tokens} but the scorer scored {scored.get('eval_tokens')}"
    return None


def scored_fields(scored: dict | None) -> dict:
    """What the ledger keeps of the scorer's result besides val_bpb: the hidden slice, probes,
    the unigram floor of the eval rows."""
    if not scored:
        return {}
    return {k: scored[k] for k in ("hidden_bpb", "hidden_tokens", "probes", "scorer_device", "unigram_bpb")
            if scored.get(k) is not None}
