"""Runner-side evaluation integrity: the trainer prints its own summary, so the runner checks
it against what the harness says it evaluated.

prepare.evaluate_bpb (protected, never agent-edited) appends one JSON line per call to the
file named by $AUTORESEARCH_EVAL_REPORT: the val_bpb it computed, the real number of tokens
it scored, the profile and dataset, the causality check's verdict, and the val_bpb of a
second validation slice the agent never sees (`hidden_bpb`). The runner refuses a result when

  - the harness found the model invalid (logits not (B, T, vocab), not finite, or logits
    before position t change when tokens from t on change: the model reads the future);
  - the summary's profile or dataset is not the run's;
  - the summary's eval_tokens is not what the harness scores for this run;
  - the harness supports the report and the summary's val_bpb is not a value evaluate_bpb
    returned in this run (the trainer computed or edited the number itself).

The trainer runs in the same process as the harness, so a deliberately adversarial edit
could still forge all of this; these checks stop honest mistakes and casual cheating
(a smaller eval, a peeking model, a hand-written number), and the protected-file checks and
the git history make anything else visible.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

REPORT_ENV = "AUTORESEARCH_EVAL_REPORT"
VAL_TOLERANCE = 1e-6   # the summary prints val_bpb with 6 decimals


def read_reports(path: Path | None) -> list[dict]:
    """Complete JSON lines of the harness report (missing file: none)."""
    if path is None or not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def harness_verdict(reports: list[dict]) -> str | None:
    """The harness's own refusal (causality, shape, finiteness), if any evaluate_bpb call made one."""
    for r in reports:
        if r.get("invalid"):
            return f"harness: {r['invalid']}"
    return None


def check_summary(summary: dict, harness: dict, reports: list[dict], expected_eval_tokens: int | None,
                  reports_required: bool) -> str | None:
    """Why this summary must not be scored, or None. `harness` is the run's harness info
    (profile, dataset); `expected_eval_tokens` the token count this run's eval must have."""
    refused = harness_verdict(reports)
    if refused:
        return refused
    for key in ("profile", "dataset"):
        want, got = harness.get(key), summary.get(key)
        if want is not None and got != want:
            return f"the summary says {key} {got!r} but the run's {key} is {want!r}"
    got_tokens = summary.get("eval_tokens")
    if expected_eval_tokens is not None and got_tokens != expected_eval_tokens:
        return (f"the summary says eval_tokens {got_tokens} but this run's evaluation scores "
                f"{expected_eval_tokens} tokens")
    if not reports_required:
        return None
    if not reports:
        return "val_bpb was not computed by prepare.evaluate_bpb (the harness recorded no evaluation)"
    val = summary.get("val_bpb")
    match = [r for r in reports if isinstance(r.get("val_bpb"), (int, float)) and isinstance(val, float)
             and math.isfinite(val) and abs(r["val_bpb"] - val) <= VAL_TOLERANCE]
    if not match:
        got = ", ".join(f"{r.get('val_bpb'):.6f}" for r in reports if isinstance(r.get("val_bpb"), (int, float)))
        return f"the summary's val_bpb {val} is not what prepare.evaluate_bpb returned ({got or 'nothing'})"
    r = match[-1]
    for key in ("profile", "dataset"):
        if harness.get(key) is not None and r.get(key) != harness.get(key):
            return f"evaluate_bpb ran with {key} {r.get(key)!r}, not the run's {harness.get(key)!r}"
    if r.get("eval_tokens") != got_tokens:
        return f"the summary says eval_tokens {got_tokens} but evaluate_bpb scored {r.get('eval_tokens')}"
    return None


def hidden_of(reports: list[dict], val_bpb: float | None) -> dict:
    """The hidden-slice numbers of the evaluation that produced val_bpb (for the ledger)."""
    for r in reversed(reports):
        if val_bpb is None or (isinstance(r.get("val_bpb"), (int, float)) and abs(r["val_bpb"] - val_bpb) <= VAL_TOLERANCE):
            if r.get("hidden_bpb") is not None:
                return {"hidden_bpb": r["hidden_bpb"], "hidden_tokens": r.get("hidden_tokens")}
            return {}
    return {}
