"""The loop. The runner, not the agent, decides: it commits, checks, trains, parses, logs
and keeps or resets. Agents only edit the training file.

One experiment, in order (the names in brackets are the fault-injection points):
  1. the agent edits the training file
  2. checks: HEAD is still the best commit, no other tracked file changed, protected
     files hash as recorded -> otherwise an `invalid` row and a reset, never a run
  3. commit the training file                                     [after_commit]
  4. ledger `start` record (the experiment in flight)
  5. train in its own process group, output to run.log           [during_run]
  6. on a crash: up to N fix attempts by the agent, each committed and re-run
  7. ledger `result`, then the results.tsv row                    [after_log]
  8. keep: the branch stays advanced; else reset to the best     [before_reset]

`run --resume` heals a kill at any of these points: see `Runner.recover`.

Extension points (kept small on purpose): `Runner.decide` is the one keep/discard rule
(`decide_greedy` by default); `Trainer` carries the command, the training file and the
log parser; `Agent` is the proposal interface. A different metric or keep rule plugs in
there without touching the git/ledger/resume machinery.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import gitops
from .agents import (Agent, AgentFailed, AgentUnavailable, BudgetExhausted, Context, Objective, Proposal,
                     make_digest)
from .faults import crash_point, worker_fault
from .ledger import Ledger
from .policy import Decisions
from .trainer import (SetupError, Trainer, confine, group_alive, harness_info, kernel_key, kill_group,
                      timeout_for)


class RunStopped(RuntimeError):
    """The loop ended for a reason the user should read (spend cap, outage too long...)."""


def decide_greedy(val_bpb: float, best_val_bpb: float) -> str:
    """Upstream's rule: keep a result strictly below the best, discard anything else.

    The one place a keep/discard decision is made; pass another function with the same
    signature to `Runner(decide=...)` to change the rule."""
    return "keep" if val_bpb < best_val_bpb else "discard"


@dataclass
class RunConfig:
    tag: str
    backend: str
    max_experiments: int | None = None       # experiments after the baseline, whole branch
    max_spend: float | None = None           # USD, agent + rubric-judge cost over the whole branch
    max_fix_attempts: int = 2
    outage_wait_s: float = 30.0              # first pause after the SDK's own retries gave up
    outage_max_wait_s: float = 600.0         # longest single pause
    outage_give_up_s: float = 12 * 3600.0    # a longer outage ends the run (resumable)
    max_agent_failures: int = 5              # consecutive proposals without a usable edit
    sandbox: str | None = None               # None: the best this machine has; "none": unsandboxed
    require_sandbox: bool = False            # refuse to start without a sandbox
    allow_network: bool = False              # let runs reach the network


@dataclass
class Runner:
    repo_root: Path
    config: RunConfig
    agent: Agent
    trainer: Trainer
    decide: Callable[[float, float], str] = decide_greedy
    decisions: Decisions = field(default_factory=Decisions)   # integrity, keep rule, re-runs (policy.py)
    out: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    harness: dict = field(default_factory=dict)
    pool: object = None        # workers.Pool: N experiments at once (waves), else one at a time

    def __post_init__(self):
        self.repo = gitops.open_repo(self.repo_root)
        self.repo_root = gitops.root(self.repo)
        self.ledger = Ledger(self.repo_root, self.config.tag)
        self.branch = gitops.BRANCH_PREFIX + self.config.tag
        self.training_file = self.trainer.training_file
        self.log_path = self.repo_root / "run.log"
        self.protected: dict[str, str] = {}
        self.protected_untracked: set[str] = set()
        self.base_commit: str | None = None
        self._judge_mark = 0.0                   # the judge's cumulative spend when this experiment began
        self.baseline_note = ""                  # why the last baseline run gave no number, when known
        # what the agents are told to improve: val_bpb (lower) unless the trainer names its metric
        self.objective = Objective(getattr(self.trainer, "metric_name", "val_bpb"),
                                   getattr(self.trainer, "direction", "min"))

    @property
    def general_mode(self) -> bool:
        return self.harness.get("mode") == "metric"

    # -- set-up --------------------------------------------------------------------------
    def start(self) -> None:
        """A new run: clean tree, new branch, data present, outputs ignored."""
        changed = gitops.changed_tracked_files(self.repo)
        if changed:
            raise SetupError("the working tree has uncommitted changes to tracked files "
                             f"({', '.join(changed[:5])}): commit or stash them first.")
        if gitops.branch_exists(self.repo, self.branch):
            raise SetupError(f"branch {self.branch} already exists: continue it with `autoresearch run "
                             f"--resume --tag {self.config.tag}` or pick a new --tag.")
        self._check_training_file()
        # a Trainer may describe its own target (general mode); else ask prepare.py
        self.harness = getattr(self.trainer, 'harness', harness_info)(self.repo_root)
        self._confine()
        self.decisions.setup(self)
        self.agent.check()
        gitops.exclude_run_outputs(self.repo)
        self._set_aside_foreign_results()
        gitops.create_branch(self.repo, self.branch)
        self.base_commit = gitops.head_sha(self.repo)
        self._record_protected()
        self._seed_kernels()
        self._session(resumed=False)
        self.ledger.rebuild_tsv()
        if self.general_mode:
            target = f"metric {self.objective.name}, {self.objective.better} is better"
        else:
            target = (f"backend {self.config.backend}, profile {self.harness.get('profile')}, "
                      f"dataset {self.harness.get('dataset')}")
        self.out(f"Started {self.branch} at {gitops.short(self.base_commit)} (agent {self.agent.name}, {target}).")

    def resume(self) -> None:
        """Continue after a crash or kill -9 at any point."""
        if gitops.remove_stale_index_lock(self.repo):
            self.out("Removed a stale .git/index.lock.")
        if not gitops.branch_exists(self.repo, self.branch):
            raise SetupError(f"nothing to resume: branch {self.branch} does not exist "
                             "(start a run without --resume).")
        sessions = self.ledger.records("session")
        if not sessions:
            raise SetupError(f"nothing to resume: ledger.jsonl has no record of tag {self.config.tag!r}.")
        self.base_commit = sessions[0]["base_commit"]
        if gitops.current_branch(self.repo) != self.branch:
            # Detached HEAD (killed mid-operation) or another branch checked out: re-attach.
            others = [f for f in gitops.changed_tracked_files(self.repo) if f != self.training_file]
            if others:
                raise SetupError(f"cannot switch to {self.branch}: uncommitted changes to {', '.join(others[:5])}.")
            self.repo.git.checkout("-q", "-f", self.branch)
            self.out(f"Re-attached HEAD to {self.branch}.")
        others = [f for f in gitops.changed_tracked_files(self.repo) if f != self.training_file]
        if others:
            raise SetupError(f"uncommitted changes to {', '.join(others[:5])} would be lost by the reset to the "
                             "best commit: commit or discard them, then rerun with --resume.")
        if not self.ledger.best() and not self.ledger.open_experiments():
            # No baseline yet (it crashed): the user may have committed a fix on the branch;
            # the baseline runs on the branch as it is now.
            self.base_commit = gitops.head_sha(self.repo)
        self._check_training_file()
        # a Trainer may describe its own target (general mode); else ask prepare.py
        self.harness = getattr(self.trainer, 'harness', harness_info)(self.repo_root)
        self._check_same_setup(sessions[0])
        self._confine()
        self.decisions.setup(self)
        self.agent.check()
        gitops.exclude_run_outputs(self.repo)
        self.protected_untracked = set(sessions[-1].get("protected_untracked", []))
        self.recover()
        self._record_protected()
        recorded = sessions[-1].get("protected", {})
        moved = [p for p, h in self.protected.items() if recorded.get(p) not in (None, h)]
        if moved:
            self.out(f"Note: protected files changed since the last session: {', '.join(moved)} (re-recorded).")
        self._seed_kernels()
        self._session(resumed=True)
        self.out(f"Resumed {self.branch}: {len(self.ledger.results())} results, best "
                 f"{self._best_val():.6f} at {gitops.short(self.best_commit())}." if self.ledger.best()
                 else f"Resumed {self.branch}: no baseline yet.")

    # What a run's results are compared on: a resume that changes one would compare numbers
    # of different measurements (README: results of different settings are never compared).
    SAME_SETUP = (("profile", "the profile (AUTORESEARCH_PROFILE)"), ("dataset", "the dataset (AUTORESEARCH_DATASET)"),
                  ("eval_tokens", "the eval size"), ("seq_len", "the sequence length"), ("mode", "the mode"),
                  ("metric_cmd", "--metric-cmd"), ("metric_regex", "--metric-regex"), ("direction", "--direction"),
                  ("scope", "--scope"))

    def _check_same_setup(self, first_session: dict) -> None:
        was = first_session.get("harness") or {}
        changed = [f"{what}: {was.get(key)!r} then, {self.harness.get(key)!r} now" for key, what in self.SAME_SETUP
                   if was.get(key) != self.harness.get(key)]
        if first_session.get("backend") not in (None, self.config.backend):
            changed.insert(0, f"the backend: {first_session['backend']!r} then, {self.config.backend!r} now")
        if changed:
            raise SetupError(f"--resume refused: run {self.config.tag!r} was started with other settings ("
                             + "; ".join(changed) + "), and its results would be compared with the new ones. "
                             f"Restore them, or start a new run: autoresearch run --tag {self.config.tag}-2 ...")

    def recover(self) -> None:
        """Close the books on whatever a kill left behind, then reset to the best commit.

        - a torn last ledger line is dropped;
        - an experiment with a `start` but no `result` is logged as a crash (its trainer, if
          still running, is killed first);
        - a commit on the branch that never got a `start` (killed right after committing)
          is logged as a crash too;
        - results.tsv is rebuilt from the ledger, so no row is missing or doubled;
        - the branch is reset to the best kept commit."""
        for note in self.ledger.repair():
            self.out(f"Repaired the ledger: {note}.")
        head = gitops.head_sha(self.repo)
        open_exps = self.ledger.open_experiments()
        for open_exp in open_exps:            # several when a wave of workers was in flight
            pgid = self.ledger.spawned_pgid(open_exp["exp"])
            if pgid and group_alive(pgid) and self._ours(pgid):
                kill_group(pgid, grace_s=2.0)
                self.out(f"Killed the orphaned trainer of experiment {open_exp['exp']} (process group {pgid}).")
            self._write_result(open_exp["exp"], open_exp["commit"], "crash",
                               open_exp["description"] + " (interrupted)", baseline=open_exp.get("baseline", False),
                               cost_usd=open_exp.get("cost_usd", 0.0), note="runner killed during the experiment")
            self.out(f"Logged interrupted experiment {open_exp['exp']} as a crash.")
        # a commit on the branch without a start (also a wave's candidate, committed but not yet started)
        known = {r.get("commit") for r in self.ledger.records() if r.get("commit")}
        best = self.best_commit()
        if head != best and head not in known and gitops.is_ancestor(self.repo, best, head):
            if gitops.runner_exp_of(self.repo, head) is None:
                raise SetupError(
                    f"{self.branch} has commits the runner did not make on top of the best commit "
                    f"{gitops.short(best)} (HEAD {gitops.short(head)}: {gitops.commit_message(self.repo, head)!r}). "
                    f"Move them to another branch, `git reset --hard {gitops.short(best)}`, then --resume.")
            desc = gitops.commit_message(self.repo, head)
            self._write_result(self.ledger.next_exp(), head, "crash", desc + " (interrupted before it ran)",
                               note="runner killed between the commit and the start record")
            self.out(f"Logged commit {gitops.short(head)} (never run) as a crash.")
        if self.ledger.rebuild_tsv():
            self.out("Rebuilt results.tsv from the ledger.")
        gitops.reset_hard(self.repo, self.best_commit())
        removed = gitops.remove_new_untracked(self.repo, self.protected_untracked)
        if removed:
            self.out(f"Removed files added to protected folders: {', '.join(removed)}")

    def _ours(self, pgid: int) -> bool:
        """Whether a recorded trainer process group is still ours: its leader, if it still
        exists, runs in this repository (guards against a reused pid)."""
        cwd = Path(f"/proc/{pgid}/cwd")
        try:
            return Path(os.readlink(cwd)) == self.repo_root
        except FileNotFoundError:
            return True          # leader gone (or no /proc): the group is what is left of ours
        except OSError:
            return False

    def _confine(self) -> None:
        c = confine(self.trainer, self.harness, self.config.sandbox, self.config.require_sandbox,
                    self.config.allow_network)
        if c.sandbox == "none":
            self.out(f"Runs are UNSANDBOXED: {c.reason}. The training file runs with your permissions "
                     "(--require-sandbox makes this an error).")
        else:
            self.out(f"Sandbox: {c.sandbox} (read-only repository, no .git, books or validation shard, "
                     f"{'network allowed' if c.allow_network else 'no network'})"
                     + ("; val_bpb from the trusted scorer." if c.scorer else "."))

    def _record_protected(self) -> None:
        self.protected = gitops.hash_paths(self.repo)
        self.protected_untracked = gitops.untracked_files(self.repo)
        if self.pool:        # a worker checks its bundle against these
            self.trainer.protected = self.protected
            self.trainer.protected_untracked = tuple(sorted(self.protected_untracked))

    def _reset(self, commit: str) -> None:
        """Back to `commit`: tracked files reset, files an agent added to protected folders
        removed; if a protected file still differs (an untracked one was edited) stop."""
        gitops.reset_hard(self.repo, commit)
        removed = gitops.remove_new_untracked(self.repo, self.protected_untracked)
        if removed:
            self.out(f"Removed files added to protected folders: {', '.join(removed)}")
        now = gitops.hash_paths(self.repo)
        touched = [p for p, h in now.items() if self.protected.get(p) != h]
        if touched:
            raise RunStopped(f"protected files {', '.join(touched)} changed and cannot be restored by git "
                             "(untracked content was edited): restore them by hand, then --resume.")

    def _check_training_file(self) -> None:
        if getattr(self.trainer, "scope", None) and not (self.repo_root / self.training_file).exists():
            raise SetupError(f"--scope {self.training_file}: no such file in {self.repo_root}.")
        if not (self.repo_root / self.training_file).exists():
            raise SetupError(f"{self.training_file} (the training file of backend {self.config.backend}) is not in "
                             f"{self.repo_root}: run from the project root or pick the other --backend.")

    def _set_aside_foreign_results(self) -> None:
        """A results.tsv from an earlier tag or a hand-run session is moved aside, not lost."""
        tsv = self.ledger.tsv_path
        if tsv.exists() and tsv.read_text() != self.ledger.expected_tsv():
            aside = tsv.with_name(f"results.before-{self.config.tag}.tsv")
            tsv.rename(aside)
            self.out(f"Moved the existing results.tsv to {aside.name}.")

    def _session(self, resumed: bool) -> None:
        self.ledger.append("session", resumed=resumed, branch=self.branch, base_commit=self.base_commit,
                           backend=self.config.backend, agent=self.agent.name, model=self.agent.model,
                           training_file=self.training_file, command=self.trainer.command,
                           protected=self.protected, protected_untracked=sorted(self.protected_untracked),
                           harness=self.harness, pid=os.getpid(),
                           max_experiments=self.config.max_experiments, max_spend=self.config.max_spend)

    def _seed_kernels(self) -> None:
        """A new training file's first run starts from the compiled kernels of the run's start
        file, which the user wrote (launch keeps the agent's files apart)."""
        start = subprocess.run(["git", "cat-file", "blob", f"{self.base_commit}:{self.training_file}"],
                               cwd=self.repo_root, capture_output=True)
        if start.returncode == 0:
            self.trainer.kernel_seed = kernel_key(start.stdout)

    # -- state -----------------------------------------------------------------------------
    def best_commit(self) -> str:
        best = self.ledger.best()
        return best["commit"] if best else self.base_commit

    def _best_val(self) -> float:
        best = self.ledger.best()
        return best["val_bpb"] if best else float("inf")

    def experiments_done(self) -> int:
        return sum(1 for r in self.ledger.results() if not r.get("baseline"))

    def _timeout(self) -> float:
        return timeout_for(float(self.harness.get("time_budget", 300)))

    # -- the loop --------------------------------------------------------------------------
    def loop(self) -> None:
        while not self.ledger.best():
            if not self.baseline():
                note = self.baseline_note
                if note:
                    raise RunStopped(f"the baseline gave no result: {note}. Fix that, then run again with --resume.")
                raise RunStopped(f"the baseline crashed: see run.log for the cause; if it is in {self.training_file}, "
                                 f"fix it, commit it on {self.branch}, and run again with --resume.")
        failures = 0
        while True:
            if self.config.max_experiments is not None and self.experiments_done() >= self.config.max_experiments:
                self.out(f"Reached --max-experiments {self.config.max_experiments}.")
                return
            self._check_spend()
            try:
                if self.pool:
                    failures = self.wave(failures)
                else:
                    self.experiment()
                    failures = 0
            except AgentFailed as e:
                if isinstance(e, BudgetExhausted):
                    raise RunStopped(f"--max-spend reached: {e}") from None
                failures += 1
                self.out(f"The agent produced no usable edit ({e}); {failures} in a row.")
                if failures >= self.config.max_agent_failures:
                    raise RunStopped(f"{failures} proposals in a row without a usable edit: stopping.") from None

    def _check_spend(self) -> None:
        if self.config.max_spend is None:
            return
        spent = self.ledger.spent_usd()
        results = self.ledger.results()
        costs = [r.get("cost_usd") or 0.0 for r in results if not r.get("baseline")]
        estimate = max(costs) if costs else self.agent.prior_cost_estimate()
        # the rubric judge scores every run, re-runs included: its dearest run so far, times
        # the runs one experiment may take
        per_run = max(((r.get("judge_cost_usd") or 0.0) / max(1, len(r.get("runs") or [0])) for r in results),
                      default=0.0)
        estimate += per_run * (1 + (self.decisions.reruns if self.decisions.rule == "noise" else 0))
        if spent + estimate > self.config.max_spend:
            raise RunStopped(f"--max-spend {self.config.max_spend:.2f} USD: ${spent:.4f} spent and the next "
                             f"experiment could cost ${estimate:.4f}; stopping before it.")

    def _judge_spend(self) -> float:
        """What the rubric judge (general mode, --rubric) has cost in this process so far."""
        return float(getattr(getattr(self.trainer, "judge", None), "cost_usd", 0.0) or 0.0)

    def baseline(self) -> bool:
        self._judge_mark = self._judge_spend()
        exp = self.ledger.next_exp()
        commit = gitops.head_sha(self.repo)
        self.out(f"[{exp}] baseline at {gitops.short(commit)}")
        self.ledger.append("start", exp=exp, commit=commit, parent=commit, description="baseline", baseline=True)
        outcome = self._train(exp)
        self.baseline_note = outcome.note
        status, extra = self.decisions.baseline(exp, outcome)
        description = f"baseline [invalid: {extra.pop('invalid_reason')}]" if status == "invalid" else "baseline"
        self._finish(exp, commit, status, description, outcome, baseline=True, **extra)
        return status == "keep"

    def experiment(self) -> None:
        self._judge_mark = self._judge_spend()
        exp = self.ledger.next_exp()
        best_commit, best_val = self.best_commit(), self._best_val()
        proposal = self._propose(exp)
        cost = proposal.cost_usd
        violation = self._violation(best_commit)
        if violation:
            self.out(f"[{exp}] invalid: {violation}")
            self._write_result(exp, None, "invalid", f"{proposal.description} [invalid: {violation}]",
                               cost_usd=cost, agent_meta=proposal.meta, usage=proposal.usage)
            self._reset(best_commit)
            return
        if self.decisions.duplicate(exp, proposal.description, best_commit, cost_usd=cost,
                                    agent_meta=proposal.meta, usage=proposal.usage):
            return
        commit = gitops.commit_file(self.repo, self.training_file, proposal.description, exp=exp)
        crash_point("after_commit", exp)
        self.ledger.append("start", exp=exp, commit=commit, parent=best_commit, description=proposal.description,
                           cost_usd=cost)
        self.out(f"[{exp}] {proposal.description} ({gitops.short(commit)})")
        outcome = self._train(exp)
        description, attempts = proposal.description, 0
        while not outcome.ok and attempts < self.config.max_fix_attempts:
            attempts += 1
            fix, fix_cost = self._fix(exp, outcome.log_tail)
            cost += fix_cost
            if fix is None or not gitops.changed_tracked_files(self.repo):
                break
            violation = self._violation(commit)
            if violation:
                self._reset(commit)
                self.out(f"[{exp}] fix attempt {attempts} rejected: {violation}")
                break
            description = fix.description
            commit = gitops.commit_file(self.repo, self.training_file, f"fix: {fix.description}", exp=exp)
            self.ledger.append("start", exp=exp, commit=commit, parent=best_commit, description=description,
                               cost_usd=cost, fix_attempt=attempts)
            self.out(f"[{exp}] fix attempt {attempts}: {fix.description} ({gitops.short(commit)})")
            outcome = self._train(exp)
        status, verdict = self.decisions.judge(exp, outcome, None if self.decide is decide_greedy else self.decide)
        if status == "invalid":
            description = f"{description} [invalid: {verdict.pop('invalid_reason')}]"
        self._finish(exp, commit, status, description, outcome, cost_usd=cost, fix_attempts=attempts,
                     agent_meta=proposal.meta, usage=proposal.usage, parent=best_commit, **verdict)
        if status != "keep":
            crash_point("before_reset", exp)
            self._reset(best_commit)

    def wave(self, failures: int = 0) -> int:
        """Up to N candidates from the best commit, trained at once on the pool, then one
        decision. Taking the best of N noisy first runs is biased (with N A/A candidates
        the best one looks like a gain far more often than one candidate does), so the
        wave's best is never kept on its first run: it is run again with a fresh seed, and
        that selection-free run goes through the sequential keep rule, re-runs and all.
        Every other candidate is discarded. Candidates are commits off the best, kept
        reachable under refs/autoresearch/<tag>/exp-<n>; the branch tip stays the best; the
        wave's rows are written in experiment order once it is decided. Returns the number
        of proposals in a row without a usable edit."""
        from .decide import blob_id, duplicate_of
        from .noise import base_seed
        parent = self.best_commit()
        left = None if self.config.max_experiments is None else self.config.max_experiments - self.experiments_done()
        size = self.pool.workers if left is None else min(self.pool.workers, left)
        seed = base_seed()
        flying, deferred, exp, stop = [], [], self.ledger.next_exp() - 1, None
        for _ in range(size):
            if failures >= self.config.max_agent_failures:
                break
            exp = max(self.ledger.next_exp(), exp + 1)
            try:
                if flying:
                    self._check_spend()
                proposal = self._propose(exp, in_flight=flying)
            except RunStopped as e:        # the wave in flight is still decided, then the run stops
                stop = e
                break
            except AgentFailed as e:
                if isinstance(e, BudgetExhausted):
                    stop = RunStopped(f"--max-spend reached: {e}")
                    break
                failures += 1
                self.out(f"The agent produced no usable edit ({e}); {failures} in a row.")
                continue
            fields = dict(cost_usd=proposal.cost_usd, agent_meta=proposal.meta, usage=proposal.usage)
            violation = self._violation(parent)
            blob = blob_id(self.repo_root, self.training_file) if not violation else None
            twin = next((c for c in flying if c["blob"] == blob), None)
            dup = None if violation or twin else duplicate_of(self.repo_root, self.training_file, self.ledger.results())
            if violation or twin or dup:
                if violation:
                    self.out(f"[{exp}] invalid: {violation}")
                    deferred.append((exp, None, "invalid", f"{proposal.description} [invalid: {violation}]", fields))
                else:
                    status, description, extra = self.decisions.duplicate_row(exp, proposal.description, twin or dup)
                    deferred.append((exp, None, status, description, {**fields, **extra}))
                    failures += 1
                self._reset(parent)
                continue
            failures = 0
            commit = gitops.commit_file(self.repo, self.training_file, proposal.description, exp=exp)
            gitops.keep_ref(self.repo, self.config.tag, exp, commit)
            crash_point("after_commit", exp)
            self.ledger.append("start", exp=exp, commit=commit, parent=parent, description=proposal.description,
                               cost_usd=proposal.cost_usd, wave=True)
            job = self.trainer.job_for(self.repo_root, self._timeout(), seed=seed, exp=exp, die=worker_fault(exp))
            self._reset(parent)
            flying.append(dict(exp=exp, commit=commit, description=proposal.description, blob=blob, fields=fields,
                               agent_meta=proposal.meta, pending=self.pool.submit(job)))
            self.out(f"[{exp}] {proposal.description} ({gitops.short(commit)}) -> worker")
        self._settle(flying, deferred, parent, seed)
        if stop:
            raise stop
        if failures >= self.config.max_agent_failures:
            raise RunStopped(f"{failures} proposals in a row without a usable edit: stopping.")
        return failures

    def _settle(self, flying: list[dict], deferred: list, parent: str, seed: int) -> None:
        """Wait for a wave, decide it, write its rows in experiment order, move the branch."""
        from .decide import gain
        from .noise import with_seed
        waiting = [c["pending"] for c in flying]
        by_pending = {id(c["pending"]): c for c in flying}
        while waiting:
            for p in self.pool.wait(waiting):
                waiting.remove(p)
                c = by_pending[id(p)]
                r = self.pool.result(p)
                if r.get("retried"):
                    self.ledger.append("retry", exp=c["exp"], note="the worker died; run once more")
                c["outcome"], c["node"], c["ran"] = r["outcome"], r.get("node"), r.get("ran")
                (self.repo_root / f"run.exp{c['exp']}.log").write_text(r["log"])
                shown = f"{c['outcome'].value:.6f}" if c["outcome"].ok else c["outcome"].problem
                self.out(f"[{c['exp']}] first run: {shown}" + (f" (node {c['node']})" if c.get("node") else ""))
        best_val = self._best_val()
        direction = self.decisions.direction
        screened = []
        for c in flying:
            c["status"], c["extra"] = self.decisions.screen(c["outcome"], self.decisions.decider.name, blob=c["blob"])
            if c["status"] is None:
                screened.append(c)
        winner = min(screened, key=lambda c: -gain(c["outcome"].value, best_val, direction), default=None)
        for c in screened:
            if c is not winner:
                c["status"] = "discard"
                c["extra"]["decision"] = f"wave of {len(flying)}: #{winner['exp']} ran better"
        if winner is not None:
            first = winner["outcome"].value
            if gain(first, best_val, direction) <= 0:
                winner["status"] = "discard"
                winner["extra"]["decision"] = f"best of a wave of {len(flying)}, not better than the best"
            else:
                self.out(f"[{winner['exp']}] best of the wave ({first:.6f}): confirming with a fresh run")
                gitops.reset_hard(self.repo, winner["commit"])
                reruns = self.decisions.reruns if self.decisions.rule == "noise" else 0
                self.trainer.prefetch(self.repo_root, [seed + i for i in range(1, reruns + 2)], self._timeout())
                fresh = with_seed(self.trainer, seed + 1).run(self.repo_root, self.repo_root / "run.log",
                                                               self._timeout())
                status, verdict = self.decisions.judge(winner["exp"], fresh,
                                                       None if self.decide is decide_greedy else self.decide,
                                                       seed_offset=1)
                self.pool.drop_prefetched()
                if status in ("crash", "invalid"):
                    reason = verdict.pop("invalid_reason", None) or verdict.get("reason") or fresh.problem
                    status, verdict = "discard", {"decision": f"the confirming run failed: {reason}"}
                verdict["decision"] = (f"best first run of a wave of {len(flying)} ({first:.6f}); confirmed on fresh "
                                       f"runs only: {verdict.get('decision', '')}")
                winner["status"], winner["outcome"] = status, fresh
                winner["extra"] = {**winner["extra"], **verdict, "screen_bpb": first}
                if status != "keep":
                    gitops.reset_hard(self.repo, parent)
        rows = [(c["exp"], c) for c in flying] + [(d[0], d) for d in deferred]
        for exp, item in sorted(rows, key=lambda row: row[0]):
            if isinstance(item, tuple):
                _, commit, status, description, fields = item
                self._write_result(exp, commit, status, description, parent=parent, **fields)
                continue
            status, extra = item["status"], dict(item["extra"])
            description = item["description"]
            if status == "invalid":
                description = f"{description} [invalid: {extra.pop('invalid_reason')}]"
            self._finish(exp, item["commit"], status, description, item["outcome"], parent=parent, wave=len(flying),
                         **({"node": item["node"]} if item.get("node") else {}),
                         **({"ran": item["ran"]} if item.get("ran") else {}), **item["fields"], **extra)
        keep = winner is not None and winner["status"] == "keep"
        self._reset(winner["commit"] if keep else parent)

    # -- pieces ----------------------------------------------------------------------------
    def _context(self, crash_log: str | None = None, in_flight: list[dict] = ()) -> Context:
        history = self.ledger.results()
        left = None
        if self.config.max_spend is not None:
            left = self.config.max_spend - self.ledger.spent_usd()
        program = self.repo_root / "program.md"
        return Context(repo_root=self.repo_root, training_file=self.training_file,
                       program=program.read_text() if program.exists() else "",
                       digest=make_digest(history, self.training_file, crash_log, objective=self.objective,
                                          in_flight=[c["description"] for c in in_flight]),
                       history=history, crash_log=crash_log, budget_left_usd=left, objective=self.objective,
                       tag=self.config.tag,
                       in_flight=[{"exp": c["exp"], "description": c["description"], "blob": c["blob"],
                                   "agent_meta": c["agent_meta"]} for c in in_flight])

    def _propose(self, exp: int, in_flight: list[dict] = ()) -> Proposal:
        """Ask the agent for an edit; an outage pauses (doubling waits) instead of ending the run."""
        wait, paused = self.config.outage_wait_s, 0.0
        while True:
            before = (self.repo_root / self.training_file).read_text()
            try:
                proposal = self.agent.propose(self._context(in_flight=in_flight))
            except AgentUnavailable as e:
                self._agent_cost(exp, e.cost_usd, f"unavailable: {e}")
                self._reset(self.best_commit())
                if paused + wait > self.config.outage_give_up_s:
                    raise RunStopped(f"the agent has been unavailable for {paused:.0f} s: {e}. "
                                     "Resume later with --resume.") from None
                self.out(f"[{exp}] agent unavailable ({e}); pausing {wait:.0f} s.")
                self.sleep(wait)
                paused += wait
                wait = min(wait * 2, self.config.outage_max_wait_s)
                continue
            except AgentFailed as e:
                self._agent_cost(exp, e.cost_usd, f"failed: {e}")
                self._reset(self.best_commit())
                raise
            if (self.repo_root / self.training_file).read_text() == before and not \
                    gitops.changed_tracked_files(self.repo):
                self._agent_cost(exp, proposal.cost_usd, "no edit")
                raise AgentFailed("the agent finished without changing the training file")
            return proposal

    def _fix(self, exp: int, log_tail: str) -> tuple[Proposal | None, float]:
        try:
            fix = self.agent.fix(self._context(crash_log=log_tail))
        except AgentFailed as e:
            return None, e.cost_usd
        except AgentUnavailable as e:
            return None, e.cost_usd
        return fix, (fix.cost_usd if fix else 0.0)

    def _agent_cost(self, exp: int, cost: float, note: str) -> None:
        if cost:
            self.ledger.append("agent_cost", exp=exp, cost_usd=cost, note=note)

    def _violation(self, expected_head: str) -> str | None:
        """Why this edit must not run, or None."""
        head = gitops.head_sha(self.repo)
        if head != expected_head:
            return f"HEAD moved from {gitops.short(expected_head)} to {gitops.short(head)} (the agent must not commit)"
        others = [f for f in gitops.changed_tracked_files(self.repo) if f != self.training_file]
        if others:
            return f"changed {', '.join(others[:5])} (only {self.training_file} may change)"
        now = gitops.hash_paths(self.repo)
        touched = [p for p, h in now.items() if self.protected.get(p) != h]
        if touched:
            return f"modified protected {', '.join(touched)}"
        if not (self.repo_root / self.training_file).exists():
            return f"deleted {self.training_file}"
        return None

    def _train(self, exp: int):

        def on_spawn(pid: int) -> None:
            self.ledger.append("spawn", exp=exp, pgid=pid)
            if os.environ.get("AUTORESEARCH_CRASH_AT", "").partition("@")[0] == "during_run":
                time.sleep(0.3)
                crash_point("during_run", exp)
        return self.trainer.run(self.repo_root, self.log_path, self._timeout(), on_spawn=on_spawn)

    def _finish(self, exp, commit, status, description, outcome, **extra) -> None:
        s = outcome.summary or {}
        val = extra.pop("val_bpb") if "val_bpb" in extra else (outcome.value if outcome.ok else None)
        mem = s.get("peak_vram_mb") / 1024 if isinstance(s.get("peak_vram_mb"), float) and outcome.ok else None
        judged = self._judge_spend() - self._judge_mark     # every scoring of this experiment, re-runs too
        if judged > 0:
            extra["judge_cost_usd"] = judged
        self._write_result(exp, commit, status, description, val_bpb=val, memory_gb=mem,
                           run_seconds=round(outcome.seconds, 2), returncode=outcome.returncode,
                           timed_out=outcome.timed_out, summary=s, sandbox=outcome.sandbox,
                           **({"attention": outcome.attention} if outcome.attention else {}),
                           **({"curve": outcome.curve} if outcome.curve else {}), **extra)
        best = self._best_val()
        shown = f"{val:.6f}" if val is not None else "-"
        self.out(f"[{exp}] {self.objective.name} {shown}  {status}  (best {best:.6f})"
                 + ("  timeout" if outcome.timed_out else ""))
        crash_point("after_log", exp)

    def _write_result(self, exp, commit, status, description, **fields) -> dict:
        s = fields.get("summary") or {}
        return self.ledger.write_result(
            exp=exp, commit=commit, commit_short=gitops.short(commit) if commit else None, status=status,
            description=description, val_bpb=fields.pop("val_bpb", None), memory_gb=fields.pop("memory_gb", None),
            backend=self.config.backend, agent=self.agent.name, model=self.agent.model,
            profile=s.get("profile", self.harness.get("profile")),
            dataset=s.get("dataset", self.harness.get("dataset")),
            eval_tokens=s.get("eval_tokens", self.harness.get("eval_tokens")),
            seed=int(os.environ.get("AUTORESEARCH_SEED", "42")),
            **{"cost_usd": 0.0, "baseline": False, **fields})


def process_start(pid: int) -> str | None:
    """When process `pid` started (an opaque stamp), or None if it is gone or unknown. A pid
    reused by another process has another start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]        # field 22: start time in clock ticks
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, IndexError):
        return None
    try:                                                   # no /proc (macOS): ps knows
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


class RunnerLock:
    """One runner per repository: .git/autoresearch.lock holds the pid and start stamp of the
    live one. A lock whose process is gone, or whose pid now belongs to another process (a
    different start stamp), is stale and taken over."""

    def __init__(self, git_dir: Path):
        self.path = Path(git_dir) / "autoresearch.lock"

    def _holder(self) -> int | None:
        """The pid of the live runner holding the lock, or None if the lock is stale."""
        try:
            record = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict):      # an older lock: a bare pid, no start stamp
            record = {"pid": record} if isinstance(record, int) else {}
        pid, start = record.get("pid"), record.get("start")
        if not isinstance(pid, int) or pid == os.getpid():
            return None
        now = process_start(pid)
        if start is None:                    # an older lock: the pid alone must do
            return pid if now is not None else None
        return pid if now is not None and now == start else None

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = self._holder()
                if pid:
                    raise SetupError(f"another autoresearch runner (pid {pid}) is working in this repository: "
                                     f"wait for it or stop it first (kill {pid}).")
                self.path.unlink(missing_ok=True)   # stale: its runner is gone
                continue
            os.write(fd, json.dumps({"pid": os.getpid(), "start": process_start(os.getpid())}).encode())
            os.close(fd)
            return self
        raise SetupError(f"cannot take {self.path}: remove it if no runner is active.")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def run(runner: Runner, resume: bool) -> int:
    """Set up or resume, then loop; returns a process exit code."""
    with RunnerLock(Path(runner.repo.git_dir)):
        try:
            return _run(runner, resume)
        finally:
            if runner.pool:           # Ctrl-C included: every worker stops, with its trainer
                runner.pool.shutdown()


def _run(runner: Runner, resume: bool) -> int:
    if resume:
        runner.resume()
    else:
        runner.start()
    try:
        runner.loop()
    except RunStopped as e:
        runner.out(f"Stopped: {e}")
        return 3
    finally:
        best = runner.ledger.best()
        if best:
            runner.out(f"Best: {runner.objective.name} {best['val_bpb']:.6f} at {best['commit_short']} ({best['description']}).")
    return 0
