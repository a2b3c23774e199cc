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
