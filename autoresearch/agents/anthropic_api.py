"""The Anthropic agent: a Messages API tool-use loop with the Anthropic-defined text editor.

One fresh conversation per experiment: program.md as a cached system prompt, the digest
of the run as the first user turn, the text editor tool (`text_editor_20250728`, name
`str_replace_based_edit_tool`) executed here against the training file only. The SDK
retries short failures itself (honouring retry-after); a failure that outlasts those
retries becomes `AgentUnavailable`, and the runner pauses and tries again.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import Agent, AgentFailed, AgentUnavailable, BudgetExhausted, Context, Proposal, system_prompt
from ..trainer import SetupError

DEFAULT_MODEL = "claude-sonnet-4-6"
EDITOR_TOOL = {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}
MAX_TOKENS = 8192

# USD per million tokens: (input, output). Cache writes cost 1.25x input, cache reads 0.1x
# (5-minute cache). Matched by model-id prefix, longest prefix first; an unknown model is
# priced as the most expensive entry so that --max-spend errs on the safe side, unless
# AUTORESEARCH_PRICE gives its price.
PRICES = {
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-6": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-3-opus": (15.0, 75.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-3-5-sonnet": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
}
CACHE_WRITE_MULT = 1.25
CACHE_READ_MULT = 0.1


def price_for(model: str) -> tuple[float, float]:
    """(input, output) USD per million tokens. AUTORESEARCH_PRICE="IN,OUT" overrides the
    table (for a model it does not know yet)."""
    override = os.environ.get("AUTORESEARCH_PRICE")
    if override:
        try:
            inp, out = (float(x) for x in override.split(","))
            return inp, out
        except ValueError:
            raise SetupError(f"AUTORESEARCH_PRICE={override!r}: expected two numbers, e.g. 3,15 "
                             "(USD per million input and output tokens).") from None
    for prefix in sorted(PRICES, key=len, reverse=True):
        if model.startswith(prefix):
            return PRICES[prefix]
    return max(PRICES.values())


def usage_cost(model: str, usage) -> float:
    inp, out = price_for(model)
    get = (lambda k: getattr(usage, k, 0) or 0) if not isinstance(usage, dict) else (lambda k: usage.get(k) or 0)
    return (get("input_tokens") * inp + get("output_tokens") * out
            + get("cache_creation_input_tokens") * inp * CACHE_WRITE_MULT
            + get("cache_read_input_tokens") * inp * CACHE_READ_MULT) / 1e6


class EditorError(Exception):
    pass


class TrainingFileEditor:
    """Executes str_replace_based_edit_tool commands, for the training file and nothing else."""

    def __init__(self, repo_root: Path, training_file: str):
        self.repo_root = Path(repo_root).resolve()
        self.training_file = training_file
        self.path = self.repo_root / training_file
        self.edits = 0

    def _check_path(self, path: str) -> None:
        p = Path(path)
        resolved = (p if p.is_absolute() else self.repo_root / p).resolve()
        if resolved != self.path.resolve():
            raise EditorError(f"Refused: this loop may only view and edit {self.training_file}; "
                              f"{path} is off limits.")

    def __call__(self, args: dict) -> str:
        command = args.get("command")
        self._check_path(str(args.get("path", "")))
        text = self.path.read_text()
        if command == "view":
            lines = text.splitlines()
            lo, hi = 1, len(lines)
            if args.get("view_range"):
                lo, hi = args["view_range"]
                hi = len(lines) if hi == -1 else hi
            return "\n".join(f"{i:6}\t{lines[i - 1]}" for i in range(max(lo, 1), min(hi, len(lines)) + 1))
        if command == "str_replace":
            old, new = args.get("old_str", ""), args.get("new_str", "")
            count = text.count(old) if old else 0
            if count != 1:
                raise EditorError(f"old_str must match exactly once in {self.training_file}; it matched {count} times.")
            self.path.write_text(text.replace(old, new, 1))
        elif command == "insert":
            at = int(args.get("insert_line", 0))
            insert = args.get("insert_text", args.get("new_str", ""))
            lines = text.splitlines(keepends=True)
            if not 0 <= at <= len(lines):
                raise EditorError(f"insert_line {at} is outside 0..{len(lines)}.")
            if insert and not insert.endswith("\n"):
                insert += "\n"
            lines.insert(at, insert)
            self.path.write_text("".join(lines))
        elif command == "create":
            self.path.write_text(args.get("file_text", ""))
        else:
            raise EditorError(f"Unsupported command {command!r}: use view, str_replace, insert or create.")
        self.edits += 1
        return "OK"


PROMPT = """You are running one experiment of an autonomous research loop.

{digest}

Make ONE focused change to {training_file} that you expect to {goal}, using
{tools}. Only {training_file} may be viewed or
edited. Do not run anything: the harness runs and scores it after you finish.
When done, reply with a final line of the form
DESCRIPTION: <one short line describing the change>"""

FIX_PROMPT = """The last experiment crashed. Fix the crash in {training_file} with a minimal edit
that keeps the idea of the change (e.g. a typo, a shape mismatch, a missing import), or make
no edit if it cannot be fixed. Use {tools}.

{digest}

When done, reply with a final line of the form
DESCRIPTION: <one short line describing the change, including the fix>"""


EDITOR_HINT = "the str_replace_based_edit_tool (view the file first)"


def experiment_prompt(ctx: Context, tools: str = EDITOR_HINT) -> str:
    return PROMPT.format(digest=ctx.digest, training_file=ctx.training_file, goal=ctx.objective.goal, tools=tools)


def fix_prompt(ctx: Context, tools: str = EDITOR_HINT) -> str:
    return FIX_PROMPT.format(digest=ctx.digest, training_file=ctx.training_file, tools=tools)


def description_from(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.strip().upper().startswith("DESCRIPTION:"):
            return line.split(":", 1)[1].strip()
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


class AnthropicAgent(Agent):
    name = "anthropic"

    def __init__(self, model: str | None = None, max_turns: int = 30, max_retries: int = 4, client=None):
        self.model = model or os.environ.get("AUTORESEARCH_MODEL") or DEFAULT_MODEL
        self.max_turns = max_turns
        self.max_retries = max_retries
        self._client = client

    @property
    def client(self):
        if self._client is None:
            import anthropic
            self._client = anthropic.Anthropic(max_retries=self.max_retries, timeout=600.0)
        return self._client

    def check(self) -> None:
        import anthropic
        if not os.environ.get("ANTHROPIC_API_KEY") and self._client is None:
            raise SetupError("--agent anthropic needs ANTHROPIC_API_KEY in the environment "
                             "(or use --agent hparam to run offline).")
        try:
            self.client.models.retrieve(self.model)
        except anthropic.NotFoundError:
            raise SetupError(f"model {self.model!r} is not available to this API key: pass a valid --model "
                             "(e.g. claude-sonnet-4-6).") from None
        except anthropic.AuthenticationError:
            raise SetupError("the Anthropic API rejected ANTHROPIC_API_KEY: check the key.") from None
        except anthropic.APIConnectionError as e:
            raise SetupError(f"cannot reach the Anthropic API ({e}): check the network or ANTHROPIC_BASE_URL.") from None

    def prior_cost_estimate(self) -> float:
        # A typical experiment: ~6 turns over a ~30k-token context, ~2k output tokens.
        return usage_cost(self.model, {"input_tokens": 30_000, "cache_read_input_tokens": 150_000,
                                       "output_tokens": 2_000})

    def propose(self, ctx: Context) -> Proposal:
        return self._converse(ctx, experiment_prompt(ctx))

    def fix(self, ctx: Context) -> Proposal | None:
        before = ctx.training_path.read_text()
        prop = self._converse(ctx, fix_prompt(ctx), require_edit=False)
        if ctx.training_path.read_text() == before:
            raise AgentFailed("the model made no fix", prop.cost_usd)
        return prop

    def _converse(self, ctx: Context, prompt: str, require_edit: bool = True) -> Proposal:
        import anthropic
        editor = TrainingFileEditor(ctx.repo_root, ctx.training_file)
        system = [{"type": "text", "text": system_prompt(ctx),
                   "cache_control": {"type": "ephemeral"}}]
        messages = [{"role": "user", "content": prompt}]
        cost, usage_total = 0.0, {}
        for _turn in range(self.max_turns):
            try:
                resp = self.client.messages.create(model=self.model, max_tokens=MAX_TOKENS, system=system,
                                                   tools=[EDITOR_TOOL], messages=messages)
            except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as e:
                raise SetupError(f"the Anthropic API refused the key ({e.status_code}): check ANTHROPIC_API_KEY, "
                                 "then --resume.") from None
            except (anthropic.APIConnectionError, anthropic.RateLimitError, anthropic.InternalServerError) as e:
                raise AgentUnavailable(f"Anthropic API unavailable after retries: {e}", cost) from None
            except anthropic.APIStatusError as e:
                if e.status_code >= 500 or e.status_code in (408, 409, 429):
                    raise AgentUnavailable(f"Anthropic API error {e.status_code}: {e}", cost) from None
                raise AgentFailed(f"Anthropic API refused the request ({e.status_code}): {e}", cost) from None
            cost += usage_cost(self.model, resp.usage)
            for k in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
                usage_total[k] = usage_total.get(k, 0) + (getattr(resp.usage, k, 0) or 0)
            if ctx.budget_left_usd is not None and cost > ctx.budget_left_usd:
                raise BudgetExhausted(f"spend cap reached during the conversation (${cost:.4f} this experiment)", cost)
            messages.append(resp.to_param())  # the assistant turn, verbatim
            if resp.stop_reason != "tool_use":
                text = "\n".join(b.text for b in resp.content if b.type == "text")
                if require_edit and editor.edits == 0:
                    raise AgentFailed("the model ended its turn without editing the training file", cost)
                return Proposal(description=description_from(text) or "(no description)", cost_usd=cost,
                                usage=usage_total, meta={"model": self.model, "turns": _turn + 1})
            results = []
            for block in resp.content:
                if block.type != "tool_use":
                    continue
                try:
                    if block.name != EDITOR_TOOL["name"]:
                        raise EditorError(f"unknown tool {block.name}")
                    out, is_error = editor(dict(block.input)), False
                except EditorError as e:
                    out, is_error = str(e), True
                results.append({"type": "tool_result", "tool_use_id": block.id, "content": out,
                                "is_error": is_error})
            messages.append({"role": "user", "content": results})
        raise AgentFailed(f"no final answer within {self.max_turns} turns", cost)
