"""prepare.py stand-in for loop tests: the runtime API surface the runner and fake trainer use."""
import os
from dataclasses import dataclass


class HarnessError(RuntimeError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    seq_len: int
    time_budget: float
    eval_tokens: int


PROFILE = Profile("smoke", 256, float(os.environ.get("FAKE_TIME_BUDGET", "15")), 64 * 256)
DATASET = "fake"


def ensure_prepared():
    if os.environ.get("FAKE_DATA_MISSING"):
        raise HarnessError("dataset 'fake' is not prepared: run `uv run prepare.py --dataset fake` first.")


def summary_fields():
    return {"dataset": DATASET, "profile": PROFILE.name, "eval_tokens": PROFILE.eval_tokens}
