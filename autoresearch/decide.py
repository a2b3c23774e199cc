"""Keep or discard: the decision rules, and the noise floor they rely on.

Two rules, chosen with `autoresearch run --decide`:

  greedy   upstream's rule: keep a result strictly better than the best, whatever the margin.
           Re-running an unchanged training file moves val_bpb by a few hundredths, so half of
           all no-op edits are "improvements" to greedy, and its running best is an optimistic
           running minimum of noise.
  noise    (the default) uses the noise floor sigma (the spread of one run of the same file
           under different seeds). With t the one-sided Student-t quantile of --confidence at
           sigma's degrees of freedom:
             - not better than the best's recorded value: discard, no re-run;
             - better: the best and the candidate are re-run in turn (--reruns runs in all,
               default 3), in the order candidate, best, best, candidate, candidate, best,
               ... (the first run is the candidate's), each pair on one seed; the candidate
               is kept only if the mean of its runs beats the mean of the best's runs of this
               confirmation by t * sigma * sqrt(1/n_candidate + 1/n_best). The box's speed
               drifts by more than the noise floor within an hour (on a 2-core CPU box the
               same file made 131 to 171 steps in 75 s), so the best's value from a run half
               an hour ago is not a fair reference: the runs it is compared with are taken
               beside the candidate's, and a steady drift cancels in that order.
               The kept value is the candidate's mean, so the best is never one lucky run.
               (--reruns 0: one run, kept when better than the recorded best by
               t * sigma * sqrt(1 + 1/n_best).)
               Re-runs stop early once the candidate is out of reach (NoiseAware.out_of_reach),
               and after the first pair when its lead over the best's run beside it is a
               clear win (NoiseAware.clear_win: the margin at confidence 1 - (1 - c) / 5).
           sigma is pooled: the noise floor's runs, then the re-runs of every experiment of
           the run (each re-run set is an unselected sample of its own file: the first run,
           picked for being better, is left out), so sigma sharpens and t shrinks as the
           run goes on.

Identical training files (same git blob) are never run twice: a candidate equal to an
earlier experiment is logged with that experiment's result and reset without training.
"""
from __future__ import annotations

import math
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DECIDE_RULES = ("noise", "greedy")
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RERUNS = 3
DEFAULT_NOISE_RUNS = 5
# the share of 1 - confidence spent on the look after the first pair (0.95 -> 0.99 there)
CLEAR_WIN_SHARE = 0.2


@dataclass
class Best:
    """The value to beat and how many runs stand behind it."""
    value: float
    runs: int = 1


@dataclass
class Verdict:
    status: str                      # keep | discard
    value: float                     # the estimate to record: the mean of `runs`
    runs: list = field(default_factory=list)     # every measured value, first run first
    seeds: list = field(default_factory=list)    # the seed offset of each re-run (1, 2, ...)
    reason: str = ""
    best_runs: list = field(default_factory=list)    # the best's runs beside the candidate's
    best_seeds: list = field(default_factory=list)   # their seed offsets (0, 1, ...)

    @property
    def reruns(self) -> int:
        return len(self.runs) - 1 + len(self.best_runs)


def gain(value: float, best: float, direction: str) -> float:
    """How much better `value` is than `best` (positive = better) for a min or max target."""
    return best - value if direction == "min" else value - best


class Greedy:
    name = "greedy"
    sigma = None

    def decide(self, value: float, best: Best, rerun: Callable[[int], float | None],
               direction: str = "min", rerun_best=None) -> Verdict:
        better = gain(value, best.value, direction) > 0
        return Verdict("keep" if better else "discard", value, [value],
                       reason="better than the best" if better else "not better than the best")


def t_quantile(p: float, df: int | None) -> float:
    """Student-t quantile: Hill's (1970) expansion around the normal quantile, within 0.01
    of the exact value for df >= 3 at p <= 0.99. df None: the normal quantile."""
    z = statistics.NormalDist().inv_cdf(p)
    if df is None:
        return z
    v = float(df)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


class NoiseAware:
    name = "noise"

    def __init__(self, sigma: float, confidence: float = DEFAULT_CONFIDENCE, reruns: int = DEFAULT_RERUNS,
                 df: int | None = None, clear_wins: bool = True):
        """sigma: the noise floor (sample std of one run); df: its degrees of freedom (runs - 1),
        so a sigma measured on few runs asks for a wider margin (Student t, not normal).
        clear_wins: keep after the first pair when the lead is a clear win (see clear_win)."""
        if not 0.5 <= confidence < 1:
            raise ValueError(f"--confidence {confidence}: use a probability in [0.5, 1), e.g. 0.95.")
        if sigma < 0 or not math.isfinite(sigma):
            raise ValueError(f"noise floor sigma {sigma} must be a finite number >= 0.")
        self.sigma = sigma
        self.confidence = confidence
        self.reruns = reruns
        self.clear_wins = clear_wins
        self.df = df if df is None or df >= 1 else None
        self.z = t_quantile(confidence, self.df)

    def margin(self, n_runs: int, n_best: int) -> float:
        """The gain a mean of n_runs must show over a best measured n_best times."""
        return self.z * self.sigma * math.sqrt(1.0 / n_runs + 1.0 / max(n_best, 1))

    def pool(self, sigma: float, df: int) -> None:
        """Use a sharper estimate of the noise floor (see pooled_sigma)."""
        self.sigma, self.df = sigma, df
        self.z = t_quantile(self.confidence, df)

    def clear_win(self, so_far: float) -> float | None:
        """The margin a lead of one run over the best's run beside it on the same seed must
        clear to be kept without the rest of the confirmation, and None when it falls short
        (or clear wins are off). It is the margin at confidence 1 - (1 - c) * CLEAR_WIN_SHARE
        (0.99 for 0.95): a clear gain costs 1 run of the best instead of 3 runs, and an edit
        that changes nothing is kept by this look at most 1% of the time (bench/false_keep.py
        measures both looks together)."""
        if not self.clear_wins:
            return None
        p = 1 - (1 - self.confidence) * CLEAR_WIN_SHARE
        need = t_quantile(p, self.df) * self.sigma * math.sqrt(2.0)
        return need if so_far >= need else None

    def out_of_reach(self, so_far: float, n: int, n_best: int, left: int, left_best: int = 0) -> bool:
        """True when the runs still to come (`left` of the candidate, `left_best` of the best,
        for n and n_best in all) could not lift the gain so far over the margin even if they
        moved it by two of their standard errors: re-runs on the leading candidates only, at
        almost no cost in power (bench/false_keep.py)."""
        if left + left_best <= 0:
            return False
        future = 2 * self.sigma * math.sqrt(left / n ** 2 + left_best / n_best ** 2)
        return so_far + future < self.margin(n, n_best)

    def decide(self, value: float, best: Best, rerun: Callable[[int], float | None],
               direction: str = "min", rerun_best: Callable[[int], float | None] | None = None) -> Verdict:
        """rerun(i): the candidate's run on seed offset i; rerun_best(i): the best's. Without
        rerun_best the candidate's runs are compared with the best's recorded value."""
        if gain(value, best.value, direction) <= 0:
            return Verdict("discard", value, [value], reason="not better than the best")
        if rerun_best is None or self.reruns == 0:
            return self._against_record(value, best, rerun, direction)
        plan = paired_plan(self.reruns)
        n, n_best = 1 + plan.count(False), plan.count(True)
        runs, seeds, best_runs, best_seeds = [value], [], [], []
        for k, of_best in enumerate(plan):
            offset = (k + 1) // 2      # pairs share a seed: candidate 0 and best 0, best 1 and candidate 1, ...
            v = (rerun_best if of_best else rerun)(offset)
            if v is None or not math.isfinite(v):
                why = "a run of the best crashed: no fair comparison" if of_best else \
                    f"re-run {offset} crashed: a change that does not run reliably is not kept"
                return Verdict("discard", statistics.fmean(runs), runs, seeds, why, best_runs, best_seeds)
            (best_runs if of_best else runs).append(v)
            (best_seeds if of_best else seeds).append(offset)
            rest = plan[k + 1:]
            so_far = gain(statistics.fmean(runs), statistics.fmean(best_runs), direction)
            clear = self.clear_win(so_far) if k == 0 and rest else None
            if clear is not None:
                return Verdict("keep", value, runs, seeds,
                               f"one run better than the best's run beside it ({best_runs[0]:.6g}) by {so_far:.6g} "
                               f">= {clear:.6g}: a clear win, no more re-runs (sigma={self.sigma:.6g})",
                               best_runs, best_seeds)
            if self.out_of_reach(so_far, n, n_best, rest.count(False), rest.count(True)):
                break
        mean, best_mean = statistics.fmean(runs), statistics.fmean(best_runs)
        mean_gain = gain(mean, best_mean, direction)
        need = self.margin(len(runs), len(best_runs))
        status = "keep" if mean_gain >= need else "discard"
        stopped = "; re-runs stopped early: out of reach" if len(runs) + len(best_runs) <= len(plan) else ""
        what = f"mean of {len(runs)} runs" if len(runs) > 1 else "one run"
        beside = f"the mean of the best's {len(best_runs)} runs" if len(best_runs) > 1 else "the best's run"
        return Verdict(status, mean, runs, seeds,
                       f"{what} better than {beside} beside it ({best_mean:.6g}) by {mean_gain:.6g} "
                       f"{'>=' if status == 'keep' else '<'} {need:.6g} (t={self.z:.2f}, sigma={self.sigma:.6g}){stopped}",
                       best_runs, best_seeds)

    def _against_record(self, value: float, best: Best, rerun: Callable[[int], float | None],
                        direction: str) -> Verdict:
        runs, seeds = [value], []
        for i in range(1, self.reruns + 1):
            v = rerun(i)
            seeds.append(i)
            if v is None or not math.isfinite(v):
                return Verdict("discard", statistics.fmean(runs), runs, seeds,
                               reason=f"re-run {i} crashed: a change that does not run reliably is not kept")
            runs.append(v)
            so_far = gain(statistics.fmean(runs), best.value, direction)
            if self.out_of_reach(so_far, self.reruns + 1, best.runs, self.reruns - i):
                break
        mean = statistics.fmean(runs)
        mean_gain = gain(mean, best.value, direction)
        need = self.margin(len(runs), best.runs)
        status = "keep" if mean_gain >= need else "discard"
        what = f"mean of {len(runs)} runs" if len(runs) > 1 else "one run"
        stopped = "; re-runs stopped early: out of reach" if len(runs) <= self.reruns else ""
        return Verdict(status, mean, runs, seeds,
                       reason=f"{what} better by {mean_gain:.6g} {'>=' if status == 'keep' else '<'} {need:.6g} "
                              f"(t={self.z:.2f}, sigma={self.sigma:.6g}){stopped}")


def paired_plan(reruns: int) -> list[bool]:
    """Whose run each re-run is (True: the best's), in the order A B B A A B B A ... that
    follows the candidate's first run (A): a drift linear in time cancels from the means."""
    return [i % 4 in (1, 2) for i in range(1, reruns + 1)]


def pooled_sigma(samples: list[list[float]]) -> tuple[float, int] | None:
    """(sigma, degrees of freedom) pooled over samples of different files: the root of the
    summed squared deviations from each sample's own mean over sum(n - 1); None without any
    sample of two or more."""
    ss, df = 0.0, 0
    for values in samples:
        if len(values) >= 2:
            m = statistics.fmean(values)
            ss += sum((v - m) ** 2 for v in values)
            df += len(values) - 1
    return (math.sqrt(ss / df), df) if df else None


# -- the noise floor -------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    """mean, sample standard deviation, min, max, n of repeated runs."""
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values) if n else None,
            "std": statistics.stdev(values) if n > 1 else None,
            "min": min(values) if n else None, "max": max(values) if n else None}


def comparable(record: dict, harness: dict, backend: str) -> bool:
    """A noise record applies to a run of the same backend, profile, dataset, eval size and
    target (metric command)."""
    h = record.get("harness") or {}
    return (record.get("backend") == backend
            and all(h.get(k) == harness.get(k) for k in ("profile", "dataset", "eval_tokens", "metric_cmd")))


def noise_floor(records: list[dict], harness: dict, backend: str) -> dict | None:
    """The latest `noise` ledger record (any tag) comparable with this run, or None."""
    found = [r for r in records if r.get("event") == "noise" and r.get("std") is not None
             and comparable(r, harness, backend)]
    return found[-1] if found else None


def best_of(result: dict | None) -> Best | None:
    if not result or result.get("val_bpb") is None:
        return None
    return Best(result["val_bpb"], len(result.get("runs") or [result["val_bpb"]]))


# -- identical files are never run twice ------------------------------------------------------
def blob_id(repo_root: Path, path: str) -> str:
    """git's content hash of a working-tree file (the id it would have once committed)."""
    out = subprocess.run(["git", "hash-object", "--", path], cwd=repo_root, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def committed_blobs(repo_root: Path, commits: list[str], path: str) -> dict[str, str]:
    """{commit: blob id of `path` in it}, one `git cat-file --batch-check` for all commits
    (commits reset away stay readable: the reflog keeps them)."""
    if not commits:
        return {}
    query = "".join(f"{c}:{path}\n" for c in commits)
    out = subprocess.run(["git", "cat-file", "--batch-check=%(objectname) %(objecttype)"], cwd=repo_root,
                         input=query, capture_output=True, text=True, check=True)
    blobs = {}
    for commit, line in zip(commits, out.stdout.splitlines()):
        sha, _, kind = line.partition(" ")
        if kind == "blob":
            blobs[commit] = sha
    return blobs


def duplicate_of(repo_root: Path, training_file: str, results: list[dict]) -> dict | None:
    """The earlier finished result (keep, discard or invalid) whose training file is byte for
    byte the current one, or None. Crashes do not count: they may have been interrupted."""
    done = [r for r in results if r.get("commit") and r.get("status") in ("keep", "discard", "invalid")]
    if not done:
        return None
    known = {r["blob"]: r for r in done if r.get("blob")}
    missing = [r["commit"] for r in done if not r.get("blob")]
    current = blob_id(repo_root, training_file)
    if current in known:
        return known[current]
    blobs = committed_blobs(repo_root, missing, training_file)
    for r in done:
        if blobs.get(r["commit"]) == current:
            return r
    return None
