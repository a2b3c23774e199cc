"""The Claude Code agent: one headless `claude -p` call per experiment.

JSON output, bounded turns and spend, the tools limited to Read and Edit of the training
file (`--permission-mode dontAsk`: only those run, whatever the user's own settings say),
a generated PreToolUse hook (`--settings`) that blocks any other edit and any command (a
target repository in general mode has no `.claude/` of its own), program.md appended to
the system prompt. Success is decided on the exit code and `is_error` (an overloaded API
ends with subtype "success" but `is_error: true`); every call's `total_cost_usd` is added
to the run's spend, failed calls included. A rejected key and an unknown model are setup
errors, found at start-up by one tiny call with few retries (the CLI retries a 401 ten
times, about 3 minutes, by default).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import Agent, AgentFailed, AgentUnavailable, BudgetExhausted, Context, Proposal, system_prompt
from .anthropic_api import description_from, experiment_prompt, fix_prompt
from ..trainer import SetupError

CALL_TIMEOUT_S = 1800
CHECK_TIMEOUT_S = 120
# Result texts that mean "fix your credentials", not "try again later".
AUTH_ERRORS = ("invalid api key", "please run /login", "authentication_error", "oauth token has expired")
MODEL_ERRORS = ("issue with the selected model", "may not exist or you may not have access")
SCOPE_HOOK = Path(__file__).with_name("scope_hook.py")
# Claude Code's own tool names (the API agent's editor tool is another one)
TOOLS = "the Read tool (read the file first) and the Edit tool (old_string must match the file exactly, once)"


class ClaudeCodeAgent(Agent):
    name = "claude-code"

    def __init__(self, model: str | None = None, max_turns: int = 30, executable: str | None = None):
        self.model = model or os.environ.get("AUTORESEARCH_MODEL")
        self.max_turns = max_turns
        self.executable = executable or os.environ.get("AUTORESEARCH_CLAUDE", "claude")

    def check(self) -> None:
        """Installed, logged in, and the model exists: one tiny call with few retries."""
        if shutil.which(self.executable) is None:
            raise SetupError(f"`{self.executable}` (Claude Code) is not installed or not on PATH: install it "
                             "with `npm install -g @anthropic-ai/claude-code`, or use --agent anthropic / hparam.")
        cmd = [self.executable, "-p", "Reply with the word OK.", "--output-format", "json", "--max-turns", "1",
               "--permission-mode", "dontAsk", "--allowedTools", "", "--disallowedTools", "Bash,Edit,Write"]
        if self.model:
            cmd += ["--model", self.model]
        env = {**os.environ, "CLAUDE_CODE_MAX_RETRIES": os.environ.get("AUTORESEARCH_CLAUDE_CHECK_RETRIES", "1")}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL, env=env)
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            return            # slow, not wrong: the loop's own calls will tell
        except (json.JSONDecodeError, IndexError):
            raise SetupError(f"`{self.executable} -p` did not answer in JSON (exit {proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip()[-300:]}") from None
        self._setup_error(out)

    def _setup_error(self, out: dict) -> None:
        """Raise SetupError for an answer that no retry will fix: a rejected key, an unknown model."""
        if not out.get("is_error"):
            return
        text = str(out.get("result", ""))
        status = out.get("api_error_status")
        if status in (401, 403) or any(k in text.lower() for k in AUTH_ERRORS):
            raise SetupError(f"Claude Code is not logged in or its key was rejected ({text[:200]}): run `claude` "
                             "once and log in, or set ANTHROPIC_API_KEY; then --resume.")
        if status == 404 or any(k in text.lower() for k in MODEL_ERRORS):
            raise SetupError(f"Claude Code cannot use the model {self.model or '(its default)'} ({text[:200]}): "
                             "pick another with --model, e.g. --model claude-sonnet-4-6.")

    def prior_cost_estimate(self) -> float:
        return 0.5

    def command(self, ctx: Context, prompt: str, settings: str | None = None) -> list[str]:
        f = ctx.training_file
        cmd = [self.executable, "-p", prompt,
               "--output-format", "json",
               "--max-turns", str(self.max_turns),
               "--permission-mode", "dontAsk",
               "--allowedTools", f"Read({f}),Edit({f})",
               "--disallowedTools", "Bash,Write,NotebookEdit,WebFetch,WebSearch,Task",
               "--append-system-prompt", system_prompt(ctx)]
        if settings:
            cmd += ["--settings", settings]
        if self.model:
            cmd += ["--model", self.model]
        if ctx.budget_left_usd is not None:
            cmd += ["--max-budget-usd", f"{max(ctx.budget_left_usd, 0.0):.4f}"]
        return cmd

    def _settings(self, ctx: Context, folder: str) -> str:
        """A settings file whose PreToolUse hook lets only the training file be edited."""
        hook = f'"{sys.executable}" "{SCOPE_HOOK}" "{Path(ctx.repo_root, ctx.training_file).resolve()}"'
        path = Path(folder) / "settings.json"
        path.write_text(json.dumps({"hooks": {"PreToolUse": [
            {"matcher": "Edit|Write|MultiEdit|NotebookEdit|Bash", "hooks": [{"type": "command", "command": hook}]}]}}))
        return str(path)

    def _call(self, ctx: Context, prompt: str) -> tuple[dict, float]:
        try:
            with tempfile.TemporaryDirectory(prefix="autoresearch-claude-") as folder:
                proc = subprocess.run(self.command(ctx, prompt, self._settings(ctx, folder)), cwd=ctx.repo_root,
                                      capture_output=True, text=True, timeout=CALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SetupError(f"`{self.executable}` (Claude Code) is not installed or not on PATH.") from None
        except subprocess.TimeoutExpired:
            raise AgentUnavailable(f"claude -p did not finish within {CALL_TIMEOUT_S} s") from None
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            raise AgentUnavailable(f"claude -p exited {proc.returncode} without JSON output: "
                                   f"{(proc.stderr or proc.stdout).strip()[-500:]}") from None
        cost = float(out.get("total_cost_usd") or 0.0)
        subtype = out.get("subtype", "")
        if subtype == "error_max_budget_usd":
            raise BudgetExhausted("claude -p stopped at --max-budget-usd", cost)
        if subtype == "error_max_turns":
            raise AgentFailed(f"claude -p used all {self.max_turns} turns without finishing", cost)
        self._setup_error(out)
        if proc.returncode != 0 or out.get("is_error"):
            # API errors (overloaded, rate limited, network) end like this: pause and retry.
            raise AgentUnavailable(f"claude -p failed (exit {proc.returncode}, subtype {subtype!r}): "
                                   f"{str(out.get('result', ''))[:500]}", cost)
        return out, cost

    def propose(self, ctx: Context) -> Proposal:
        before = ctx.training_path.read_text()
        out, cost = self._call(ctx, experiment_prompt(ctx, TOOLS))
        if ctx.training_path.read_text() == before:
            raise AgentFailed("claude -p finished without editing the training file", cost)
        return self._proposal(out, cost)

    def fix(self, ctx: Context) -> Proposal | None:
        before = ctx.training_path.read_text()
        out, cost = self._call(ctx, fix_prompt(ctx, TOOLS))
        if ctx.training_path.read_text() == before:
            raise AgentFailed("claude -p made no fix", cost)
        return self._proposal(out, cost)

    def _proposal(self, out: dict, cost: float) -> Proposal:
        return Proposal(description=description_from(str(out.get("result", ""))) or "(no description)",
                        cost_usd=cost, usage=out.get("usage") or {},
                        meta={"session_id": out.get("session_id"), "num_turns": out.get("num_turns"),
                              "model": self.model})
