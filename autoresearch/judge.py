"""A yes/no rubric scored by an LLM judge (Anthropic Messages API): score = number of yes.

The rubric file lists 3 to 6 criteria, one per line, as a markdown list ("- ...", "* ..." or
"1. ..."); other lines (a title, blank lines, comments) are ignored. Each scoring is one
fresh request: the criteria and the artifact (the scope files, plus the output of
--metric-cmd when one is given) go in; one line per criterion, `N: yes` or `N: no`, comes
back. A reply that does not answer every criterion is an error, not a zero. A judge is a
noisy instrument: the noise-aware keep rule re-asks it (re-runs) before keeping a gain
smaller than its measured spread (`autoresearch noise --rubric FILE --scope FILE`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

MIN_CRITERIA, MAX_CRITERIA = 3, 6
DEFAULT_JUDGE_MODEL = "claude-sonnet-4-6"
_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(.+?)\s*$")
_ANSWER = re.compile(r"^\s*(?:criterion\s*)?(\d+)\s*[:.)\-]\s*\**\s*(yes|no)\b", re.IGNORECASE)

SYSTEM = ("You are a strict, literal judge. You answer yes or no to each numbered criterion about "
          "the artifact you are given, judging only what is in the artifact. Answer yes only when the "
          "criterion is clearly met.")

PROMPT = """Criteria:
{criteria}

Artifact:
<artifact>
{artifact}
</artifact>

Reply with exactly {n} lines, one per criterion in order, each of the form `N: yes` or `N: no`,
and nothing else."""


class JudgeError(RuntimeError):
    """The judge could not score (API failure, unparseable reply); the run counts as a crash."""


def parse_rubric(text: str, source: str = "rubric") -> list[str]:
    criteria = [m.group(1) for line in text.splitlines() if (m := _ITEM.match(line))]
    if not MIN_CRITERIA <= len(criteria) <= MAX_CRITERIA:
        from .trainer import SetupError
        raise SetupError(f"{source} has {len(criteria)} criteria; write {MIN_CRITERIA} to {MAX_CRITERIA} yes/no "
                         "criteria, one per line as a list item (\"- The function has a docstring\").")
    return criteria


def parse_answers(reply: str, n: int) -> list[bool]:
    answers: dict[int, bool] = {}
    for line in reply.splitlines():
        m = _ANSWER.match(line)
        if m and 1 <= int(m.group(1)) <= n and int(m.group(1)) not in answers:
            answers[int(m.group(1))] = m.group(2).lower() == "yes"
    missing = [i for i in range(1, n + 1) if i not in answers]
    if missing:
        raise JudgeError(f"the judge did not answer criteria {missing}: {reply[:300]!r}")
    return [answers[i] for i in range(1, n + 1)]


class RubricJudge:
    def __init__(self, criteria: list[str], model: str | None = None, client=None, max_retries: int = 4):
        self.criteria = list(criteria)
        self.model = model or os.environ.get("AUTORESEARCH_JUDGE_MODEL") or DEFAULT_JUDGE_MODEL
        self.max_retries = max_retries
        self._client = client
        self.cost_usd = 0.0

    @classmethod
    def from_file(cls, path: str | Path, **kw) -> "RubricJudge":
        p = Path(path)
        if not p.is_file():
            from .trainer import SetupError
            raise SetupError(f"--rubric {path}: no such file (write 3-6 yes/no criteria, one per line).")
        return cls(parse_rubric(p.read_text(), str(path)), **kw)

    @property
    def client(self):
        if self._client is None:
            import anthropic
            self._client = anthropic.Anthropic(max_retries=self.max_retries, timeout=300.0)
        return self._client

    def check(self) -> None:
        if self._client is None and not os.environ.get("ANTHROPIC_API_KEY"):
            from .trainer import SetupError
            raise SetupError("--rubric needs ANTHROPIC_API_KEY in the environment: the criteria are scored by "
                             "an LLM judge through the Anthropic API.")

    def score(self, artifact: str) -> tuple[int, list[bool]]:
        """(number of yes, the answers in criterion order)."""
        import anthropic
        from .agents.anthropic_api import usage_cost
        criteria = "\n".join(f"{i}. {c}" for i, c in enumerate(self.criteria, 1))
        try:
            resp = self.client.messages.create(
                model=self.model, max_tokens=200, system=SYSTEM,
                messages=[{"role": "user", "content": PROMPT.format(criteria=criteria, artifact=artifact,
                                                                    n=len(self.criteria))}])
        except anthropic.APIError as e:
            raise JudgeError(f"the judge's API request failed: {e}") from None
        self.cost_usd += usage_cost(self.model, resp.usage)
        reply = "\n".join(b.text for b in resp.content if b.type == "text")
        answers = parse_answers(reply, len(self.criteria))
        return sum(answers), answers
