"""HarnessError: a problem the user fixes, shown as its message rather than a traceback.

Defined here, below prepare.py, because the machinery in harness/ raises it too; prepare.py
re-exports it (prepare.HarnessError is this class) and installs the hook that prints it.
"""
import sys


class HarnessError(RuntimeError):
    """A user-facing problem; the message says what is wrong and how to fix it."""


def install_excepthook():
    """From now on a HarnessError that reaches the top of the program prints `error: <message>`."""
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        # A HarnessError that reaches the top of a trainer or of this CLI is a user mistake
        # (missing data, bad setting): print its message, not a traceback.
        if issubclass(exc_type, HarnessError):
            print(f"error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    sys.excepthook = excepthook
