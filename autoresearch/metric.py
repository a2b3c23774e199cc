"""General-purpose mode: the same loop for anything a command can score.

    autoresearch run --metric-cmd "python bench.py" --metric-regex "time_ms: ([0-9.]+)" \\
        --direction min --scope solver.py [--guard "python -m pytest -q"] [--rubric RUBRIC.md]

A `MetricTrainer` is the runner's Trainer for this mode: the agent may edit only the scope
file, the runner commits it, runs the metric command in its own process group (same
timeout, log and kill rules as a training run), reads the number from the LAST match of the
regex (its first group, or the whole match), then runs the guard; a guard that fails makes
the run unusable, like a crash: the agent gets its fix attempts, then the change is reset.
With --rubric the score is the number of criteria an LLM judge answers yes for (direction
max), judged on the scope file plus the metric command's output when one is given.

Git, the ledger, resume, agents and the keep rules (greedy or noise-aware, with re-runs
under new AUTORESEARCH_SEED values) are the runner's, unchanged. The val_bpb column of
results.tsv holds the metric.
"""
from __future__ import annotations

import fnmatch
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .trainer import RunOutcome, SetupError, Trainer, launch, log_tail

DIRECTIONS = ("min", "max")
DEFAULT_METRIC_BUDGET = 60.0   # seconds a metric command is expected to take; timeout = max(2x, +120 s)
GUARD_TIMEOUT = 1800.0


def check_scope(repo_root: Path, scope: str) -> None:
    """The scope file must be a regular file tracked in this repository (after symlinks are
    resolved), and not one the runner protects or writes."""
    from . import gitops
    root = repo_root.resolve()
    path = (root / scope).resolve()
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        raise SetupError(f"--scope {scope}: resolves to {path}, outside the repository {root}; the agent may "
                         "edit only a file of this repository.") from None
    if path.is_dir():
        raise SetupError(f"--scope {scope} is a folder: name the one file the agent may edit, e.g. --scope {rel}/main.py.")
    if not path.is_file():
        raise SetupError(f"--scope {scope}: no such file in {root}.")
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "--", rel], cwd=root, capture_output=True)
    if tracked.returncode != 0:
        raise SetupError(f"--scope {scope} is not tracked by git: `git add {rel} && git commit` it first, so every "
                         "change the agent makes is a commit you can see.")
    protected = [p for p in (*gitops.PROTECTED_PATHS, ".git") if rel == p or rel.startswith(p.rstrip("/") + "/")]
    if os.path.normpath(scope) != rel:
        raise SetupError(f"--scope {scope} is a link or an indirect path to {rel}: name the file itself, --scope {rel}.")
    if protected or any(fnmatch.fnmatch(rel, p) for p in gitops.RUN_OUTPUTS):
        raise SetupError(f"--scope {scope} is part of the harness or the runner's books, which the agent may never "
                         "edit: pick the file that holds what you want improved.")


def compile_regex(pattern: str) -> re.Pattern:
    try:
        rx = re.compile(pattern, re.MULTILINE)
    except re.error as e:
        raise SetupError(f"--metric-regex {pattern!r} is not a valid regular expression ({e}).") from None
    if rx.groups > 1:
        raise SetupError(f"--metric-regex {pattern!r} has {rx.groups} groups: use one group around the number, "
                         "e.g. 'time_ms: ([0-9.]+)'.")
    return rx


def metric_name(pattern: str | None) -> str:
    """The metric's name as the agents and the log lines call it: the last word of the regex
    before its group ('time_ms: ([0-9.]+)' -> 'time_ms'), else 'score'."""
    if not pattern:
        return "score"
    m = re.search(r"\((?!\?)", pattern)
    if not m:
        return "score"
    prefix = re.sub(r"\\.", " ", pattern[:m.start()])      # escapes (\s, \d, \.) are not words
    prefix = re.sub(r"\[[^\]]*\]|\{[^}]*\}", " ", prefix)   # nor are classes and counts
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", prefix)
    return words[-1] if words else "score"


def parse_metric(log: str, rx: re.Pattern) -> dict | None:
    """{'val_bpb': value, 'metric': value} from the last match, or None."""
    matches = list(rx.finditer(log))
    if not matches:
        return None
    raw = matches[-1].group(1) if rx.groups else matches[-1].group(0)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return {"val_bpb": value, "metric": value} if math.isfinite(value) else None


@dataclass
class MetricTrainer(Trainer):
    metric_cmd: str = ""
    metric_regex: str = ""
    direction: str = "min"
    scope: tuple = ()
    guard: str | None = None
    judge: object = None            # RubricJudge, when --rubric is given
    budget_s: float = DEFAULT_METRIC_BUDGET
    metric_name: str = "score"
    rubric_file: str | None = None

    @classmethod
    def build(cls, metric_cmd: str | None, metric_regex: str | None, direction: str, scope: list[str],
              guard: str | None = None, rubric: str | None = None, judge_model: str | None = None,
              budget_s: float = DEFAULT_METRIC_BUDGET) -> "MetricTrainer":
        if not scope:
            raise SetupError("--scope names the file the agent may edit: e.g. --scope solver.py.")
        if len(scope) > 1:
            raise SetupError(f"--scope {' '.join(scope)}: the agents edit one file per run; name one file.")
        scope = [os.path.normpath(f) for f in scope]      # ./solver.py is solver.py
        judge = None
        if rubric:
            from .judge import RubricJudge
            judge = RubricJudge.from_file(rubric, model=judge_model)
            direction = "max"
        elif not metric_cmd or not metric_regex:
            raise SetupError("general mode needs --metric-cmd CMD and --metric-regex RE (the number to optimize), "
                             "or --rubric FILE.")
        if direction not in DIRECTIONS:
            raise SetupError(f"--direction {direction!r}: use min or max.")
        rx = compile_regex(metric_regex) if metric_regex else None
        command = ["/bin/sh", "-c", metric_cmd] if metric_cmd else ["/bin/sh", "-c", "true"]
        parse = (lambda log: parse_metric(log, rx)) if rx else (lambda log: {})
        return cls(backend="metric", training_file=scope[0], command=command, parse=parse,
                   metric_cmd=metric_cmd or "", metric_regex=metric_regex or "", direction=direction,
                   scope=tuple(scope), guard=guard, judge=judge, budget_s=budget_s,
                   metric_name="rubric score" if judge else metric_name(metric_regex), rubric_file=rubric)

    def harness(self, repo_root: Path) -> dict:
        """What the ledger records about the target (instead of prepare.py's profile)."""
        for f in self.scope:
            check_scope(Path(repo_root), f)
        info = {"mode": "metric", "metric_cmd": self.metric_cmd, "metric_regex": self.metric_regex,
                "direction": self.direction, "scope": list(self.scope), "guard": self.guard,
                "time_budget": self.budget_s}
        if self.judge is not None:
            info.update(rubric=self.judge.criteria, rubric_file=self.rubric_file, judge_model=self.judge.model)
        return info

    def check(self) -> None:
        if self.judge is not None:
            self.judge.check()

    def run(self, repo_root: Path, log_path: Path, timeout_s: float, on_spawn=None) -> RunOutcome:
        outcome = super().run(repo_root, log_path, timeout_s, on_spawn=on_spawn)
        if outcome.returncode == 0 and outcome.summary is None and self.metric_regex and not outcome.tampered:
            outcome = self._unreadable(log_path, outcome)
        if self.judge is not None and outcome.returncode == 0 and not outcome.tampered:
            outcome = self._judge(repo_root, log_path, outcome)
        if self.guard and outcome.ok:
            outcome = self._guard(repo_root, log_path, outcome)
        return outcome

    def _unreadable(self, log_path: Path, outcome: RunOutcome) -> RunOutcome:
        """Say why a clean exit gave no number: the regex never matched, or the value is not finite."""
        log = log_path.read_text(errors="replace")
        matches = list(compile_regex(self.metric_regex).finditer(log))
        if matches:
            raw = matches[-1].group(1) if matches[-1].re.groups else matches[-1].group(0)
            note = f"the metric value {raw!r} (last match of --metric-regex) is not a finite number"
        else:
            last = " | ".join(line.strip() for line in log.strip().splitlines()[-3:]) or "no output"
            note = (f"--metric-regex {self.metric_regex!r} did not match the output of `{self.metric_cmd}` "
                    f"(last lines: {last[:300]})")
        text = self._append(log_path, f"\n[autoresearch] {note}\n")
        return RunOutcome(outcome.returncode, False, outcome.seconds, None, log_tail(text), sandbox=outcome.sandbox,
                          note=note)

    def _append(self, log_path: Path, text: str) -> str:
        with open(log_path, "a") as f:
            f.write(text)
        return log_path.read_text(errors="replace")

    def _judge(self, repo_root: Path, log_path: Path, outcome: RunOutcome) -> RunOutcome:
        from .judge import JudgeError
        parts = [f"=== {f} ===\n{(Path(repo_root) / f).read_text(errors='replace')}" for f in self.scope]
        if self.metric_cmd:
            parts.append(f"=== output of `{self.metric_cmd}` ===\n{log_path.read_text(errors='replace')[-20000:]}")
        try:
            score, answers = self.judge.score("\n\n".join(parts))
        except JudgeError as e:
            text = self._append(log_path, f"\n[autoresearch] rubric judge failed: {e}\n")
            return RunOutcome(1, False, outcome.seconds, None, log_tail(text), sandbox=outcome.sandbox)
        lines = "".join(f"  {'yes' if a else 'no ':<3}  {c}\n" for c, a in zip(self.judge.criteria, answers))
        text = self._append(log_path, f"\n[autoresearch] rubric: {score}/{len(answers)}\n{lines}")
        summary = {"val_bpb": float(score), "metric": float(score), "rubric": answers}
        return RunOutcome(0, False, outcome.seconds, summary, log_tail(text), sandbox=outcome.sandbox)

    def _guard(self, repo_root: Path, log_path: Path, outcome: RunOutcome) -> RunOutcome:
        """The guard runs through the same sandboxed launch path as the metric command."""
        with tempfile.TemporaryDirectory(prefix="autoresearch-guard-") as d:
            guard = launch(["/bin/sh", "-c", self.guard], repo_root, Path(d) / "guard.log", GUARD_TIMEOUT,
                           env={**os.environ, **self.env}, confinement=self.confinement, parse=lambda text: {})
            output = (Path(d) / "guard.log").read_text(errors="replace")
        code = -1 if guard.timed_out else guard.returncode
        if guard.tampered:
            code = code or 1
        verdict = "passed" if code == 0 else f"FAILED (exit {code})"
        if guard.timed_out:
            output += f"(killed after {GUARD_TIMEOUT:.0f} s)"
        text = self._append(log_path, f"\n[autoresearch] guard `{self.guard}` {verdict}\n{output[-8000:]}")
        if code == 0:
            return RunOutcome(outcome.returncode, False, outcome.seconds, outcome.summary, log_tail(text),
                              sandbox=outcome.sandbox)
        return RunOutcome(code if code > 0 else 1, False, outcome.seconds, None, log_tail(text),
                          sandbox=outcome.sandbox, tampered=guard.tampered)
