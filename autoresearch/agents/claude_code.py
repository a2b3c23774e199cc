"""The Claude Code agent: one headless `claude -p` call per experiment.

JSON output, bounded turns and spend, tools limited to reading and editing the training
file, program.md appended to the system prompt. Success is decided on the exit code and
`is_error` (an overloaded API ends with subtype "success" but `is_error: true`); every
call's `total_cost_usd` is added to the run's spend, failed calls included.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

from . import Agent, AgentFailed, AgentUnavailable, BudgetExhausted, Context, Proposal, system_prompt
from .anthropic_api import description_from, experiment_prompt, fix_prompt
from ..trainer import SetupError

CALL_TIMEOUT_S = 1800
# Result texts that mean "fix your credentials", not "try again later".
AUTH_ERRORS = ("invalid api key", "please run /login", "authentication_error", "oauth token has expired")


class ClaudeCodeAgent(Agent):
    name = "claude-code"

    def __init__(self, model: str | None = None, max_turns: int = 30, executable: str | None = None):
        self.model = model or os.environ.get("AUTORESEARCH_MODEL")
        self.max_turns = max_turns
        self.executable = executable or os.environ.get("AUTORESEARCH_CLAUDE", "claude")

    def check(self) -> None:
        if shutil.which(self.executable) is None:
            raise SetupError(f"`{self.executable}` (Claude Code) is not installed or not on PATH: install it "
                             "with `npm install -g @anthropic-ai/claude-code`, or use --agent anthropic / hparam.")

    def prior_cost_estimate(self) -> float:
        return 0.5

    def command(self, ctx: Context, prompt: str) -> list[str]:
        f = ctx.training_file
        cmd = [self.executable, "-p", prompt,
               "--output-format", "json",
               "--max-turns", str(self.max_turns),
               "--allowedTools", f"Read({f}),Edit({f})",
               "--disallowedTools", "Bash,Write,NotebookEdit,WebFetch,WebSearch,Task",
               "--append-system-prompt", system_prompt(ctx)]
        if self.model:
            cmd += ["--model", self.model]
        if ctx.budget_left_usd is not None:
            cmd += ["--max-budget-usd", f"{max(ctx.budget_left_usd, 0.0):.4f}"]
        return cmd

    def _call(self, ctx: Context, prompt: str) -> tuple[dict, float]:
        try:
            proc = subprocess.run(self.command(ctx, prompt), cwd=ctx.repo_root, capture_output=True,
                                  text=True, timeout=CALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
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
        text = str(out.get("result", ""))
        if out.get("is_error") and any(k in text.lower() for k in AUTH_ERRORS):
            raise SetupError(f"Claude Code is not logged in or its key was rejected ({text[:200]}): run `claude` "
                             "once and log in, or set ANTHROPIC_API_KEY; then --resume.")
        if proc.returncode != 0 or out.get("is_error"):
            # API errors (overloaded, rate limited, network) end like this: pause and retry.
            raise AgentUnavailable(f"claude -p failed (exit {proc.returncode}, subtype {subtype!r}): "
                                   f"{str(out.get('result', ''))[:500]}", cost)
        return out, cost

    def propose(self, ctx: Context) -> Proposal:
        before = ctx.training_path.read_text()
        out, cost = self._call(ctx, experiment_prompt(ctx))
        if ctx.training_path.read_text() == before:
            raise AgentFailed("claude -p finished without editing the training file", cost)
        return self._proposal(out, cost)

    def fix(self, ctx: Context) -> Proposal | None:
        before = ctx.training_path.read_text()
        out, cost = self._call(ctx, fix_prompt(ctx))
        if ctx.training_path.read_text() == before:
            raise AgentFailed("claude -p made no fix", cost)
        return self._proposal(out, cost)

    def _proposal(self, out: dict, cost: float) -> Proposal:
        return Proposal(description=description_from(str(out.get("result", ""))) or "(no description)",
                        cost_usd=cost, usage=out.get("usage") or {},
                        meta={"session_id": out.get("session_id"), "num_turns": out.get("num_turns"),
                              "model": self.model})
