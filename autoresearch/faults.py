"""Fault injection for the resume tests: kill the runner at a named point, as `kill -9` would."""
from __future__ import annotations

import os
import signal


def crash_point(name: str, exp: int) -> None:
    """AUTORESEARCH_CRASH_AT=name or name@exp kills this process with SIGKILL at that point."""
    want = os.environ.get("AUTORESEARCH_CRASH_AT")
    if not want:
        return
    point, _, at = want.partition("@")
    if point == name and (not at or int(at) == exp):
        os.kill(os.getpid(), signal.SIGKILL)


def worker_fault(exp: int) -> int:
    """AUTORESEARCH_CRASH_AT=worker@N (or worker-twice@N): on how many attempts the Ray worker of
    experiment N kills itself mid-run (1, or 2: its retry too); 0 for every other run."""
    point, _, at = os.environ.get("AUTORESEARCH_CRASH_AT", "").partition("@")
    if point in ("worker", "worker-twice") and (not at or int(at) == exp):
        return 2 if point == "worker-twice" else 1
    return 0
