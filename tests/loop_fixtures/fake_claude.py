#!/usr/bin/env python3
"""A fake `claude` executable for the claude-code agent tests (installed on PATH as `claude`).

It answers the agent's start-up check ("Reply with the word OK."), records the argv of every
other call, then behaves per FAKE_CLAUDE_MODE:
  edit            raise MATRIX_LR in the training file by 1.5x, report success
  overloaded_once first call: an API 529 (subtype "success", is_error true, exit 1); then edit
  noedit          report success without editing
  max_turns       stop with subtype error_max_turns
  logged_out      the CLI's answer when it has no valid credentials
Each call costs FAKE_CLAUDE_COST dollars (default 0.05).
"""
import json
import os
import re
import sys
from pathlib import Path

args = sys.argv[1:]
mode = os.environ.get("FAKE_CLAUDE_MODE", "edit")
cost = float(os.environ.get("FAKE_CLAUDE_COST", "0.05"))
if args[1:2] == ["Reply with the word OK."]:     # the agent's start-up check: not an experiment
    bad = mode == "logged_out"
    print(json.dumps({"type": "result", "subtype": "success", "is_error": bad, "num_turns": 1, "total_cost_usd": 0,
                      "result": "Invalid API key · Please run /login" if bad else "OK"}))
    sys.exit(1 if bad else 0)
with open(os.environ["FAKE_CLAUDE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
calls = sum(1 for _ in open(os.environ["FAKE_CLAUDE_LOG"]))


def result(text, subtype="success", is_error=False, code=0):
    print(json.dumps({"type": "result", "subtype": subtype, "is_error": is_error, "duration_ms": 12,
                      "num_turns": 3, "result": text, "session_id": f"sess-{calls}",
                      "total_cost_usd": cost, "usage": {"input_tokens": 10, "output_tokens": 5}}))
    sys.exit(code)


if mode == "overloaded_once" and calls == 1:
    result('API Error: 529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
           is_error=True, code=1)
if mode == "logged_out":
    result("Invalid API key · Please run /login", is_error=True, code=1)
if mode == "max_turns":
    result("", subtype="error_max_turns", is_error=True, code=1)
if mode == "noedit":
    result("I looked around.\nDESCRIPTION: nothing")

tools = args[args.index("--allowedTools") + 1]
training_file = re.search(r"Edit\(([^)]+)\)", tools).group(1)
p = Path(training_file)
text = p.read_text()
m = re.search(r"^MATRIX_LR = ([0-9.eE+-]+)", text, re.M)
new = float(f"{float(m.group(1)) * 1.5:.4g}")
p.write_text(text.replace(m.group(0), f"MATRIX_LR = {new}", 1))
result(f"Raised the matrix learning rate.\nDESCRIPTION: MATRIX_LR {m.group(1)} -> {new}")
