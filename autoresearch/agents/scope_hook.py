#!/usr/bin/env python3
"""Claude Code PreToolUse hook the claude-code agent hands the CLI (`--settings`): only the
one file named on the command line may be edited, and nothing may be run.

It works in any target repository, general mode included, where no `.claude/` hook exists.
Claude Code pipes the pending tool call as JSON on stdin; exit 2 blocks it and shows
stderr to the model. Standard library only.
"""
import json
import os
import sys
from pathlib import Path

EDIT_TOOLS = ("Edit", "Write", "MultiEdit", "NotebookEdit")


def main() -> int:
    allowed = Path(sys.argv[1]).resolve()
    call = json.load(sys.stdin)
    tool = call.get("tool_name", "")
    args = call.get("tool_input") or {}
    if tool == "Bash":
        print("autoresearch: running commands is not allowed; edit the training file only.", file=sys.stderr)
        return 2
    if tool in EDIT_TOOLS:
        raw = args.get("file_path") or args.get("notebook_path") or ""
        path = Path(os.path.expanduser(raw))
        path = (path if path.is_absolute() else Path(call.get("cwd") or os.getcwd()) / path).resolve()
        if path != allowed:
            print(f"autoresearch: only {allowed.name} may be edited (not {raw}).", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
