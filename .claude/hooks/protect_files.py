#!/usr/bin/env python3
"""Claude Code PreToolUse hook: refuse edits to the files the research loop protects.

Claude Code pipes the pending tool call as JSON on stdin. Exit code 2 blocks the call and
shows stderr to the model; exit 0 lets it through. Edit/Write/MultiEdit/NotebookEdit are
checked by path; Bash commands are refused when they name a protected path together with
something that writes (a redirection, sed -i, tee, mv, cp, rm, git checkout/restore, ...).
Standard library only: it runs with whatever python3 Claude Code finds.
"""
import json
import os
import re
import shlex
import sys
from pathlib import Path

# Keep in sync with autoresearch/gitops.py PROTECTED_PATHS (a test checks it).
PROTECTED = ("prepare.py", "harness", "pyproject.toml", "uv.lock", "program.md", "autoresearch", "metal_kernels",
             ".claude", "CLAUDE.md")
WRITE_VERBS = re.compile(r"(^|\s)(sed\s+(-\w*\s+)*-i|perl\s+-\w*i|tee|mv|cp|rm|truncate|dd|ln|chmod|install|"
                         r"git\s+(checkout|restore|rm|mv|apply|am|stash|reset))(\s|$)")


def project_root() -> Path:
    env = os.environ.get("CLAUDE_PROJECT_DIR")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[2]


def protected_hit(path: str, cwd: Path, root: Path):
    """The protected entry `path` falls under, or None."""
    p = Path(os.path.expanduser(path))
    p = (p if p.is_absolute() else cwd / p).resolve()
    for name in PROTECTED:
        target = root / name
        if p == target or target in p.parents:
            return name
    return None


def check_bash(command: str, cwd: Path, root: Path):
    for segment in re.split(r"&&|\|\||;|\n|\|", command):
        try:
            words = shlex.split(segment)
        except ValueError:
            words = segment.split()
        redirect_targets = re.findall(r">>?\s*([^\s;&|]+)", segment)
        for target in redirect_targets:
            hit = protected_hit(target, cwd, root)
            if hit:
                return hit
        if WRITE_VERBS.search(segment):
            for w in words:
                if not w.startswith("-"):
                    hit = protected_hit(w, cwd, root)
                    if hit:
                        return hit
    return None


def main() -> int:
    try:
        call = json.load(sys.stdin)
    except json.JSONDecodeError:
        return 0
    root = project_root()
    cwd = Path(call.get("cwd") or os.getcwd())
    tool = call.get("tool_name", "")
    args = call.get("tool_input") or {}
    hit = None
    if tool in ("Edit", "Write", "MultiEdit", "NotebookEdit"):
        path = args.get("file_path") or args.get("notebook_path") or ""
        hit = protected_hit(path, cwd, root) if path else None
    elif tool == "Bash":
        hit = check_bash(args.get("command", ""), cwd, root)
    if hit:
        print(f"Blocked: {hit} is protected in this project (see program.md). Only the training file "
              "(train_mlx.py or train.py) may be edited.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
