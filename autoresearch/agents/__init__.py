"""Agents propose one edit to the training file and describe it in one line; the runner
does everything else (commit, run, judge, log, reset).

Three implementations share the `Agent` interface:
  hparam       offline: a coordinate search over the hyperparameter constants at the top of the file
  hparam-tpe   offline: Optuna's TPE over the same constants, ask-and-tell, the study beside the ledger
  anthropic    the Messages API with the Anthropic-defined text editor tool
  claude-code  `claude -p`, headless, tools limited to the training file
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

AGENTS = ("anthropic", "claude-code", "hparam", "hparam-tpe")


@dataclass(frozen=True)
class Objective:
    """What the agents are told to improve: the metric's name and which way is better
    (val_bpb, lower, for training runs; general mode names its own metric)."""
    name: str = "val_bpb"
    direction: str = "min"

    @property
    def better(self) -> str:
        return "lower" if self.direction == "min" else "higher"

    @property
    def sentence(self) -> str:
        return f"{self.better.capitalize()} {self.name} is better."

    @property
    def goal(self) -> str:
        """The verb phrase of an experiment's aim, e.g. "lower val_bpb", "raise rubric score"."""
        return f"{'lower' if self.direction == 'min' else 'raise'} {self.name}"

    def best(self, results: list[dict]) -> dict:
        pick = min if self.direction == "min" else max
        return pick(results, key=lambda r: r["val_bpb"])


@dataclass
class Context:
    """What an agent sees for one experiment (a fresh conversation each time)."""
    repo_root: Path
    training_file: str
    program: str                     # program.md: the human's research direction
    digest: str                      # compact history, built by `make_digest`
    history: list[dict]              # this run's result records, oldest first
    crash_log: str | None = None     # set for a fix attempt: the tail of run.log
    budget_left_usd: float | None = None
    objective: Objective = field(default_factory=Objective)
    tag: str = ""                    # the run's tag (the offline TPE agent's study name)
    in_flight: list = field(default_factory=list)   # candidates being trained now (workers): exp, description, blob

    @property
    def training_path(self) -> Path:
        return self.repo_root / self.training_file


@dataclass
class Proposal:
    description: str
    cost_usd: float = 0.0
    usage: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)   # stored in the ledger (e.g. which constant moved)


class AgentUnavailable(RuntimeError):
    """A transient failure (API overloaded, network down): the runner pauses and retries."""
    def __init__(self, message: str, cost_usd: float = 0.0):
        super().__init__(message)
        self.cost_usd = cost_usd


class AgentFailed(RuntimeError):
    """This proposal failed for good (no usable edit); the runner discards it and moves on."""
    def __init__(self, message: str, cost_usd: float = 0.0):
        super().__init__(message)
        self.cost_usd = cost_usd


class BudgetExhausted(AgentFailed):
    """The spend cap was reached inside an experiment; the runner stops."""


class Agent:
    name = "agent"
    model: str | None = None

    def check(self) -> None:
        """Fail fast at start-up (missing key, unknown model, missing executable)."""

    def propose(self, ctx: Context) -> Proposal:
        raise NotImplementedError

    def fix(self, ctx: Context) -> Proposal | None:
        """Repair a crash (ctx.crash_log holds the log tail). Returning None or raising
        AgentFailed (which carries the cost spent) gives up."""
        return None

    def prior_cost_estimate(self) -> float:
        """A guess at one experiment's cost before any has been measured."""
        return 0.0


def default_agent_name() -> str:
    return "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "hparam"


def make_agent(name: str, model: str | None = None, seed: int = 0, max_turns: int = 30) -> Agent:
    if name == "hparam":
        from .hparam import HparamAgent
        return HparamAgent(seed=seed)
    if name == "hparam-tpe":
        from .tpe import TPEAgent
        return TPEAgent(seed=seed)
    if name == "anthropic":
        from .anthropic_api import AnthropicAgent
        return AnthropicAgent(model=model, max_turns=max_turns)
    if name == "claude-code":
        from .claude_code import ClaudeCodeAgent
        return ClaudeCodeAgent(model=model, max_turns=max_turns)
    raise ValueError(f"unknown agent {name!r}: use one of {', '.join(AGENTS)}")


def system_prompt(ctx: Context) -> str:
    """The system prompt: program.md (the human's brief) when the project has one, else a
    short brief that states the objective."""
    if ctx.program.strip():
        return ctx.program
    return (f"You are a researcher improving {ctx.training_file}, one focused edit at a time. "
            f"Objective: {ctx.objective.sentence}")


def make_digest(history: list[dict], training_file: str, crash_log: str | None = None,
                last_n: int = 20, objective: Objective | None = None, in_flight: list[str] = ()) -> str:
    """The compact state of the run an agent gets instead of a long conversation."""
    obj = objective or Objective()
    name = obj.name
    lines = [f"Training file: {training_file}. {obj.sentence}"]
    if history:
        base = history[0]
        lines.append(f"Baseline: {name} {base.get('val_bpb') or 0:.6f} (commit {base.get('commit_short')}).")
        kept = [r for r in history if r["status"] == "keep" and isinstance(r.get("val_bpb"), (int, float))]
        if kept:
            best = obj.best(kept)
            lines.append(f"Best so far: {name} {best['val_bpb']:.6f} (commit {best['commit_short']}: "
                         f"{best['description']}). The file you see is this best version.")
        if len(kept) > 1:
            lines.append("Kept changes, in order:")
            lines += [f"  - {r['description']} -> {r['val_bpb']:.6f}" for r in kept[1:]]
        lines.append(f"Last {min(last_n, len(history))} results (commit, {name}, memory_gb, status, description):")
        for r in history[-last_n:]:
            val = r.get("val_bpb") or 0.0
            mem = r.get("memory_gb") or 0.0
            lines.append(f"  {r.get('commit_short') or '-------'}  {val:.6f}  {mem:.1f}  {r['status']:<7}  {r['description']}")
    if in_flight:
        lines.append("Being trained now, from this same file (propose a different idea, not one of these):")
        lines += [f"  - {d}" for d in in_flight]
    if crash_log:
        lines.append("The last run crashed. Tail of run.log:")
        lines.append(crash_log[-4000:])
    return "\n".join(lines)
