"""What the runner asks after each run: is the result valid, and keep or discard?

`Decisions` joins the integrity checks (integrity.py), the keep rules (decide.py) and the
noise floor (noise.py) behind four calls the runner makes:

  setup(runner)           after the harness is known (start, resume): report file, noise floor
  duplicate(...)          before committing a candidate: identical files are never run twice
  baseline(...) / judge(...)  after a run: status and the extra ledger fields

Re-runs go through the same trainer with AUTORESEARCH_SEED = seed + i, each logged as a
`rerun` ledger record (and `spawn`, so a killed runner's --resume kills an orphan); a re-run
of the best (the noise rule's paired runs) puts the best's file in the working tree for its
run and records `of_best`.
"""
from __future__ import annotations

import math
import os
import time

from . import gitops
from .agents import AgentFailed
from .faults import crash_point
from .trainer import SetupError
from .decide import (DEFAULT_CONFIDENCE, DEFAULT_NOISE_RUNS, DEFAULT_RERUNS, Greedy, NoiseAware, best_of,
                     blob_id, duplicate_of, noise_floor, pooled_sigma)
from .integrity import check_summary, scored_fields
from .noise import base_seed, format_noise, measure, noise_record, with_seed

class Decisions:
    def __init__(self, rule: str = "greedy", confidence: float = DEFAULT_CONFIDENCE,
                 reruns: int = DEFAULT_RERUNS, noise_runs: int = DEFAULT_NOISE_RUNS):
        if rule not in ("greedy", "noise"):
            raise ValueError(f"unknown --decide rule {rule!r}: use noise or greedy.")
        self.rule = rule
        self.confidence = confidence
        self.reruns = reruns
        self.noise_runs = noise_runs
        self.decider = Greedy()
        self.scorer_required = False
        self.runner = None
        self.floor: dict | None = None     # the noise record the rule uses

    # -- set-up ----------------------------------------------------------------------------
    def setup(self, runner) -> None:
        self.runner = runner
        # val_bpb runs of a prepare.py that speaks the scorer protocol are scored by the
        # runner's scorer; general mode and harnesses without it are checked on their summary
        self.scorer_required = bool(runner.trainer.confinement.scorer)
        runner.harness["decide"] = {"rule": self.rule, "confidence": self.confidence, "reruns": self.reruns,
                                    "noise_runs": self.noise_runs}
        self._load_floor()
        runner.out(f"Keep rule: {self.describe()}.")

    def _load_floor(self) -> None:
        if self.rule != "noise":
            return
        r = self.runner
        floor = noise_floor(r.ledger.all_records(), r.harness, r.config.backend)
        self.floor = floor
        if floor is not None:
            self.decider = NoiseAware(floor["std"], self.confidence, self.reruns, floor["n"] - 1)

    @property
    def direction(self) -> str:
        return getattr(self.runner.trainer, "direction", "min")

    def _direction_field(self) -> dict:
        return {"direction": "max"} if self.direction == "max" else {}

    def describe(self) -> str:
        if isinstance(self.decider, NoiseAware):
            return (f"noise-aware (sigma {self.decider.sigma:.6f}, confidence {self.confidence}, "
                    f"up to {self.reruns} re-runs of every apparent gain and of the best beside it)")
        if self.rule == "noise":
            return f"noise-aware (noise floor measured on the baseline: {self.noise_runs} runs)"
        return "greedy (strictly better)"

    # -- checks ----------------------------------------------------------------------------
    def _expected_eval_tokens(self) -> int | None:
        if self.scorer_required:
            return None    # the scorer's count is checked instead
        r = self.runner
        base = [x for x in r.ledger.results() if x.get("baseline") and x.get("status") == "keep"]
        if base and isinstance((base[0].get("summary") or {}).get("eval_tokens"), int):
            return base[0]["summary"]["eval_tokens"]
        return r.harness.get("eval_tokens")

    def check(self, outcome) -> str | None:
        """Why a finished run's summary must not be scored, or None."""
        return check_summary(outcome.summary, self.runner.harness, outcome.scored,
                             self._expected_eval_tokens(), self.scorer_required)

    def duplicate(self, exp: int, description: str, best_commit: str, **fields) -> bool:
        """If the edited file is identical to one already run, log that result again (not
        re-run), reset, and raise AgentFailed: the runner counts it as a proposal without a
        usable edit, so an agent stuck on files it already tried stops the run
        (max_agent_failures in a row) instead of spinning. Else return False."""
        r = self.runner
        dup = duplicate_of(r.repo_root, r.training_file, r.ledger.results())
        if dup is None:
            return False
        status, description, extra = self.duplicate_row(exp, description, dup)
        r._write_result(exp, None, status, description, **extra, **fields)
        r._reset(best_commit)
        raise AgentFailed(f"the edit reproduced experiment {dup['exp']}'s training file exactly")

    def duplicate_row(self, exp: int, description: str, dup: dict) -> tuple[str, str, dict]:
        """(status, description, fields) of an edit identical to `dup`: an earlier result, or a
        candidate still in flight (a wave), which has no status or value yet."""
        status = "invalid" if dup.get("status") == "invalid" else "discard"
        short = f" {dup['commit_short']}" if dup.get("commit_short") else ""
        ran = "not re-run" if "status" in dup else "not run"
        shown = f" ({dup['commit_short']})" if dup.get("commit_short") else ""
        self.runner.out(f"[{exp}] identical to experiment {dup['exp']}{shown}: {ran}, {status}")
        return (status, f"{description} [identical to #{dup['exp']}{short}: {ran}]",
                {"duplicate_of": dup["exp"], **({"val_bpb": dup["val_bpb"]} if "val_bpb" in dup else {})})

    # -- decisions -------------------------------------------------------------------------
    def _pool_sigma(self, exp: int) -> None:
        """Sharpen sigma with every re-run set this run has measured (decide.py's pooling): the
        candidates' re-runs and the best's runs beside them."""
        samples = [list((self.floor or {}).get("values") or [])]
        results = [r for r in self.runner.ledger.results() if not r.get("baseline")]
        samples += [r["runs"][1:] for r in results if len(r.get("runs") or []) >= 3]
        samples += [r["best_runs"] for r in results if len(r.get("best_runs") or []) >= 2]
        pooled = pooled_sigma(samples)
        if pooled is None or pooled[1] == self.decider.df:
            return
        self.decider.pool(*pooled)
        self.runner.out(f"[{exp}] noise floor pooled over {pooled[1]} degrees of freedom: sigma {pooled[0]:.6f}, "
                        f"t {self.decider.z:.2f}")

    def _failed(self, outcome) -> tuple[str, dict]:
        if outcome.tampered:
            return "invalid", {"invalid_reason": "the run changed " + "; ".join(outcome.tampered[:5]) + " (undone)"}
        if outcome.scored and outcome.scored.get("invalid"):
            return "invalid", {"invalid_reason": f"scorer: {outcome.scored['invalid']}"}
        tail = outcome.log_tail or ""
        if "[autoresearch] guard" in tail and "FAILED" in tail:
            return "crash", {"note": "guard failed", "reason": "guard failed"}
        last = next((line.strip() for line in reversed(tail.splitlines())
                     if line.strip() and not line.startswith("[autoresearch]")), "")
        return "crash", {"reason": outcome.problem + (f": {last[:200]}" if last else "")}

    def screen(self, outcome, rule_name: str, blob: str | None = None) -> tuple[str | None, dict]:
        """(crash/invalid, fields) for a run that cannot be scored; else (None, the fields
        every scored result records). `blob`: the run's training file, when it is not the one
        in the working tree (a wave's candidates)."""
        if not outcome.ok:
            return self._failed(outcome)
        problem = self.check(outcome)
        if problem:
            # the logged number is the scorer's, whatever the summary claimed
            return "invalid", {"invalid_reason": problem, "val_bpb": (outcome.scored or {}).get("val_bpb")}
        r = self.runner
        unigram = {"unigram_bpb": outcome.summary["unigram_bpb"]} \
            if is_finite((outcome.summary or {}).get("unigram_bpb")) else {}
        return None, {"blob": blob or blob_id(r.repo_root, r.training_file), "decide": rule_name,
                      **unigram, **scored_fields(outcome.scored), **self._direction_field()}

    def baseline(self, exp: int, outcome) -> tuple[str, dict]:
        """The baseline's status and fields; with the noise rule and no comparable noise floor,
        the baseline is run noise_runs times in all and the floor is recorded."""
        status, extra = self.screen(outcome, self.rule)
        if status:
            return status, extra
        r = self.runner
        value = outcome.value
        floor = self.floor
        if floor is not None and floor.get("blob") == extra["blob"] and floor.get("values"):
            # the noise floor was measured on this very file: its runs are baseline runs too
            values = list(floor["values"]) + [value]
            extra.update(val_bpb=sum(values) / len(values), runs=values,
                         seeds=list(floor.get("seeds", [])) + [base_seed()])
            r.out(f"[{exp}] baseline file = the noise floor's file: best = mean of {len(values)} runs "
                  f"({extra['val_bpb']:.6f})")
        elif self.rule == "noise" and not isinstance(self.decider, NoiseAware) and self.noise_runs > 1:
            seed = base_seed()
            if hasattr(r.trainer, "prefetch"):     # workers: the noise runs go out at once
                r.trainer.prefetch(r.repo_root, [seed + i for i in range(1, self.noise_runs)], r._timeout())
            r.out(f"[{exp}] measuring the noise floor: {self.noise_runs - 1} more baseline runs "
                  f"(seeds {seed + 1}..{seed + self.noise_runs - 1})")
            values, seeds, problems = measure(
                r.trainer, r.repo_root, self.noise_runs - 1, r._timeout(), first_seed=seed + 1,
                check=self.check,
                on_spawn=lambda pid: r.ledger.append("spawn", exp=exp, pgid=pid),
                on_run=lambda i, s, o, p: r.out(f"[{exp}]   seed {s}: "
                                                + (f"{o.value:.6f}" if o.ok else "-")
                                                + (f"  {p}" if p else "")))
            values, seeds = [value] + values, [seed] + seeds
            record = noise_record(r.ledger, r.trainer, r.harness, r.config.backend, values, seeds, problems,
                                  r.repo_root, "baseline")
            r.out(f"[{exp}] {format_noise(record, getattr(r.trainer, 'metric_name', 'val_bpb'))}")
            if record.get("std") is not None:
                self.floor = record
                self.decider = NoiseAware(record["std"], self.confidence, self.reruns, record["n"] - 1)
                extra.update(val_bpb=record["mean"], runs=values, seeds=seeds)
            else:
                r.out(f"[{exp}] not enough usable runs for a noise floor: deciding greedily.")
        return "keep", extra

    def judge(self, exp: int, outcome, custom=None, seed_offset: int = 0) -> tuple[str, dict]:
        """keep / discard / invalid / crash for an experiment, with re-runs if the rule asks.
        `custom(val, best_val) -> status` replaces the rule (Runner.decide set by hand).
        `seed_offset`: the run being judged used seed + seed_offset (a wave's confirming run),
        so its re-runs take the seeds after it."""
        status, extra = self.screen(outcome, self.decider.name)
        if status:
            return status, extra
        r = self.runner
        value = outcome.value
        best = best_of(r.ledger.best())
        if best is None:     # the loop runs experiments only after a kept baseline: the books are damaged
            raise SetupError(f"ledger.jsonl has no kept baseline for run {r.config.tag!r}, so there is nothing to "
                             "compare with: the books are damaged. Restore ledger.jsonl (from a backup, or set aside "
                             "lines in ledger.corrupt.jsonl), or start a new run with another --tag.")
        if custom is not None:
            return custom(value, best.value), extra
        if isinstance(self.decider, NoiseAware):
            self._pool_sigma(exp)
            extra.update(sigma=round(self.decider.sigma, 6), sigma_df=self.decider.df)
        seed = base_seed() + seed_offset

        def on_spawn(pid: int) -> None:
            r.ledger.append("spawn", exp=exp, pgid=pid)   # --resume kills an orphaned re-run too
            if os.environ.get("AUTORESEARCH_CRASH_AT", "").partition("@")[0] == "during_rerun":
                time.sleep(0.3)
                crash_point("during_rerun", exp)

        def rerun(i: int, of_best: bool = False) -> float | None:
            name = f"run.seed{seed + i}.best.log" if of_best else f"run.seed{seed + i}.log"
            o = with_seed(r.trainer, seed + i).run(r.repo_root, r.repo_root / name, r._timeout(), on_spawn=on_spawn)
            problem = self.check(o) if o.ok else o.problem
            v = o.value if o.ok and not problem else None
            r.ledger.append("rerun", exp=exp, seed=seed + i, val_bpb=v, problem=problem, seconds=round(o.seconds, 2),
                            sandbox=o.sandbox, **({"of_best": best_commit} if of_best else {}))
            r.out(f"[{exp}]   re-run{' of the best' if of_best else ''} seed {seed + i}: "
                  + (f"{v:.6f}" if v is not None else f"- ({problem})"))
            return v

        best_commit = r.best_commit()
        path = r.repo_root / r.training_file
        files = {}      # the candidate's and the best's bytes, read at the first run of the best

        def rerun_best(i: int) -> float | None:
            # the best's file in the working tree for one run; --resume resets a killed one
            if not files:
                files.update(candidate=path.read_bytes(),
                             best=gitops.file_at(r.repo_root, best_commit, r.training_file))
            path.write_bytes(files["best"])
            try:
                return rerun(i, of_best=True)
            finally:
                path.write_bytes(files["candidate"])

        verdict = self.decider.decide(value, best, rerun, self.direction, rerun_best)
        extra["decision"] = verdict.reason
        if verdict.reruns:
            extra.update(val_bpb=verdict.value, runs=verdict.runs, seeds=[seed] + [seed + i for i in verdict.seeds],
                         reruns=verdict.reruns)
        if verdict.best_runs:
            extra.update(best_runs=verdict.best_runs, best_seeds=[seed + i for i in verdict.best_seeds])
        return verdict.status, extra


def direction_key(result: dict) -> float:
    """Sort key that puts the best result first for min and max targets alike."""
    v = result["val_bpb"]
    return -v if result.get("direction") == "max" else v


def is_finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def report_lines(results: list[dict]) -> list[str]:
    """For `autoresearch report`: what each keep rule did and cost, and the hidden slice."""
    lines = []
    experiments = [r for r in results if not r.get("baseline")]
    rules = sorted({r.get("decide") for r in experiments if r.get("decide")})
    for rule in rules:
        mine = [r for r in experiments if r.get("decide") == rule]
        keeps = sum(1 for r in mine if r["status"] == "keep")
        reruns = sum(r.get("reruns", 0) for r in mine)
        rerun_keeps = sum(1 for r in mine if r["status"] == "keep" and r.get("reruns"))
        lines.append(f"keep rule {rule}: {keeps} keeps of {len(mine)} scored experiments, {reruns} re-runs "
                     f"({sum(1 for r in mine if r.get('reruns'))} experiments re-run, {rerun_keeps} kept after re-runs)")
    kinds = [r.get("sandbox") for r in results if r.get("sandbox")]
    if kinds:
        counts = ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds)))
        lines.append(f"sandbox of the runs: {counts}" + ("  (WARNING: unsandboxed runs)" if "none" in kinds else ""))
    dups = sum(1 for r in experiments if r.get("duplicate_of") is not None)
    if dups:
        lines.append(f"identical training files not re-run: {dups}")
    noise = [r for r in results if r.get("baseline") and r.get("runs")]
    if noise:
        import statistics
        runs = noise[-1]["runs"]
        lines.append(f"noise floor (baseline, {len(runs)} runs): std {statistics.stdev(runs):.6f}")
    hidden = [r for r in results if r["status"] == "keep" and is_finite(r.get("hidden_bpb"))
              and is_finite(r.get("val_bpb"))]
    if len(hidden) >= 2:
        first, last = hidden[0], min(hidden, key=direction_key)
        main_gain, hidden_gain = first["val_bpb"] - last["val_bpb"], first["hidden_bpb"] - last["hidden_bpb"]
        lines.append(f"hidden validation slice (never selected on), kept runs: baseline {first['hidden_bpb']:.6f} "
                     f"-> best {last['hidden_bpb']:.6f} ({hidden_gain:+.6f} vs {main_gain:+.6f} on val_bpb)")
        if len(hidden) >= 3 and main_gain > 0 and hidden_gain < 0.5 * main_gain:
            lines.append("WARNING: the hidden slice improved by less than half of val_bpb's gain: the keeps may "
                         "overfit the main validation slice.")
    return lines
