"""Does the loop find a real gain? The research-efficacy benchmark, on the cpu profile.

    uv run bench/research.py --arm noise                 # LR handicap, the noise rule, 12 experiments
    uv run bench/research.py --arm greedy                # the same start, upstream's greedy rule
    uv run bench/research.py --arm aa                    # no handicap, comment-only edits: counts keeps
    uv run bench/research.py --arm noise --agent hparam-tpe --handicap lr,warmdown
    uv run bench/research.py --arm aa --resume           # finish an arm that was interrupted

An arm starts from train_mlx.py with a planted handicap (`lr`: every learning rate x 0.25;
`warmdown`: WARMDOWN_RATIO = 0; `depth`: DEPTH = 8, too deep for the budget), committed in a
fresh checkout of this project's harness under --workdir, and runs the real loop on it
(`Runner`: sandboxed runs, the trusted scorer, the chosen keep rule) for --experiments
experiments with the offline agent (the noise rule measures its noise floor on the start:
--noise-runs baseline runs, 4 here against the runner's 5: an arm is an hour of ~85 s runs,
and the loop pools sigma over the best's runs as it goes). Then every file that matters is re-scored with fresh seeds
(1000, 1001, ...; the loop uses 42 and up), through the same sandboxed launch, a round per
seed (seed 1000 of every file, then 1001, ...: a box's speed drifts within the hour, so
files compared with each other run minutes apart):

  - the start and the final best (the last keep), with --seeds,
  - the reference (the file without the handicap), with --keep-seeds: it is only the gap's
    denominator, an error of 0.01 in it moves the share recovered by a tenth of itself,
  - every keep before the best, with --keep-seeds (default 2: each such keep costs ~3 minutes).

It prints the share of the handicap's gap recovered, (start - best) / (start - reference) on
fresh-seed means; the keeps; and the keep precision: of the kept commits, how many beat their
parent (the previous keep, or the start) on the mean of the fresh seeds both ran (paired
seeds: the same initial weights for both files). The A/A arm has no handicap and
an agent that only rewrites a comment: every keep there is a false keep (with none, nothing
is re-scored).

Fresh-seed scores are cached per arm and training-file content in <workdir>/<arm>.scores.json,
so --resume does not measure them again; one JSON line per arm goes to
<workdir>/research.jsonl. Needs the builtin dataset (`uv run prepare.py --dataset builtin`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from autoresearch import gitops  # noqa: E402
from autoresearch.agents import Agent, Proposal, make_agent  # noqa: E402
from autoresearch.agents.hparam import blob_hash, read_constants, set_constant  # noqa: E402
from autoresearch.decide import DEFAULT_RERUNS  # noqa: E402
from autoresearch.integrity import check_summary  # noqa: E402
from autoresearch.noise import measure  # noqa: E402
from autoresearch.policy import Decisions  # noqa: E402
from autoresearch.runner import RunConfig, Runner, run  # noqa: E402
from autoresearch.trainer import Trainer, confine, harness_info, kernel_key, timeout_for  # noqa: E402

TRAINING_FILE = "train_mlx.py"
HARNESS_FILES = ("prepare.py", "harness", "program.md", TRAINING_FILE)
LEARNING_RATES = ("EMBEDDING_LR", "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR")
FRESH_SEED = 1000


def plant(text: str, handicaps: list[str]) -> str:
    """The training file with the handicaps planted in its hyperparameter block."""
    values = {name: value for name, value, _ in read_constants(text)}
    for h in handicaps:
        if h == "lr":
            for name in LEARNING_RATES:
                text = set_constant(text, name, values[name] * 0.25)
        elif h == "warmdown":
            text = set_constant(text, "WARMDOWN_RATIO", 0.0)
        elif h == "depth":
            text = set_constant(text, "DEPTH", 8)
        elif h != "none":
            raise SystemExit(f"unknown handicap {h!r}: use lr, warmdown, depth or none")
    return text


class CommentAgent(Agent):
    """The A/A agent: each proposal rewrites one comment line and nothing else."""
    name = "comment-only"

    def propose(self, ctx):
        path = ctx.training_path
        lines = path.read_text().splitlines(keepends=True)
        n = len(ctx.history)
        marker = "# A/A note:"
        lines = [l for l in lines if not l.startswith(marker)] + [f"{marker} revision {n}\n"]
        path.write_text("".join(lines))
        return Proposal(description=f"comment only (A/A revision {n})")


def checkout(path: Path, training_text: str) -> Path:
    """A committed project checkout at `path`: this project's harness and the given trainer."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for name in HARNESS_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, path / name)
    (path / TRAINING_FILE).write_text(training_text)
    (path / ".gitignore").write_text("__pycache__/\n")
    commit(path, "start")
    return path


def share_kernels(src: Path, dst: Path, key: str) -> None:
    """Give checkout `dst` the compiled kernels of the file with kernel_key `key` that `src`'s
    runs built (the loop's, to the re-scoring's), so its first run of that file skips MLX's
    ~55 s CPU compile. Only for the start file, which the benchmark wrote: kernels of an
    agent's file never cross checkouts."""
    built = src / ".git" / "autoresearch-kernels" / key
    target = dst / ".git" / "autoresearch-kernels" / key
    if built.is_dir() and not target.exists():
        target.parent.mkdir(exist_ok=True)
        shutil.copytree(built, target, symlinks=True)


def commit(path: Path, message: str) -> None:
    import git
    repo = git.Repo.init(path, initial_branch="master")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "research bench")
        cw.set_value("user", "email", "bench@localhost")
    repo.git.add("-A")
    if repo.is_dirty(index=True, untracked_files=True) or not repo.head.is_valid():
        repo.git.commit("-q", "--allow-empty", "-m", message)


class FreshScores:
    """Fresh-seed val_bpb of training files, cached by content in <workdir>/scores.json. A file
    asked for more seeds than it has runs the missing ones (the next seeds) and keeps the rest."""

    def __init__(self, workdir: Path, seeds: int, name: str = "scores.json", kernels_from: Path | None = None):
        self.path = workdir / name
        self.seeds = seeds
        self.kernels_from = kernels_from   # a checkout whose compiled kernels of the start the scratch may take
        self.cache = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.scratch = workdir / "rescore"
        self.kernel_seed: str | None = None   # kernel_key of the start: each new file's first run begins from its kernels

    def of(self, text: str, label: str, seeds: int | None = None) -> dict[int, float]:
        """{seed: val_bpb} of the file's usable runs among fresh seeds FRESH_SEED .. FRESH_SEED + seeds - 1."""
        wanted = self.seeds if seeds is None else seeds
        entry = self.cache.setdefault(blob_hash(text), {"label": label, "values": [], "seeds": [], "problems": [],
                                                        "tried": 0, "seconds": 0.0})
        if entry["tried"] < wanted:
            self._run(text, label, entry, wanted)
        return {s: v for s, v in zip(entry["seeds"], entry["values"]) if s < FRESH_SEED + wanted}

    def _run(self, text: str, label: str, entry: dict, wanted: int) -> None:
        root = self.scratch
        if not root.exists():
            checkout(root, text)
            if self.kernels_from and self.kernel_seed:
                share_kernels(self.kernels_from, root, self.kernel_seed)
        (root / TRAINING_FILE).write_text(text)
        commit(root, label)
        trainer = Trainer.for_backend("mlx")
        trainer.kernel_seed = self.kernel_seed
        harness = harness_info(root)
        confine(trainer, harness)
        t0 = time.time()

        def check(outcome):
            return check_summary(outcome.summary, harness, outcome.scored, None, True)

        def on_run(i, seed, outcome, problem):
            shown = f"{outcome.value:.4f}" if outcome.ok and not problem else f"- ({problem})"
            print(f"    fresh seed {seed} of {label}: {shown} ({outcome.seconds:.0f} s)", flush=True)

        logs = self.scratch.parent / "rescore-logs" / blob_hash(text)[:12]   # outside the checkout
        logs.mkdir(parents=True, exist_ok=True)
        values, seeds, problems = measure(trainer, root, wanted - entry["tried"], timeout_for(harness["time_budget"]),
                                          log_dir=logs, first_seed=FRESH_SEED + entry["tried"], check=check,
                                          on_run=on_run)
        entry["values"] += values
        entry["seeds"] += seeds
        entry["problems"] += problems
        entry["tried"] = wanted
        entry["seconds"] = round(entry["seconds"] + time.time() - t0, 1)
        self.path.write_text(json.dumps(self.cache, indent=1))


def mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def run_arm(args, workdir: Path) -> dict:
    t0 = time.time()
    reference = (REPO / TRAINING_FILE).read_text()
    handicaps = ["none"] if args.arm == "aa" else args.handicap.split(",")
    start = plant(reference, handicaps)
    print(f"== arm {args.arm}: handicap {'+'.join(handicaps)}, agent "
          f"{'comment-only' if args.arm == 'aa' else args.agent}, {args.experiments} experiments, "
          f"{args.seeds} fresh seeds ({args.keep_seeds} for the reference and a keep before the best)", flush=True)
    tag = f"{args.arm}-{args.agent}-{'+'.join(handicaps)}"
    root = workdir / tag
    if args.resume and not (root / "ledger.jsonl").exists():
        sys.exit(f"--resume: {root} holds no interrupted arm {tag}; run the arm without --resume.")

    rule = "greedy" if args.arm == "greedy" else "noise"
    if not args.resume:
        checkout(root, start)
    agent = CommentAgent() if args.arm == "aa" else make_agent(args.agent)
    runner = Runner(root, RunConfig(tag=tag, backend="mlx", max_experiments=args.experiments),
                    agent, Trainer.for_backend("mlx"),
                    decisions=Decisions(rule, confidence=args.confidence, reruns=args.reruns,
                                        noise_runs=args.noise_runs))
    before = active_minutes(runner.ledger) if args.resume else 0.0   # the part before the interruption
    run(runner, resume=args.resume)
    loop_minutes = before + (time.time() - t0) / 60

    results = runner.ledger.results()
    kept = [r for r in results if r["status"] == "keep"]
    repo = gitops.open_repo(root)
    keeps = [(r, repo.git.show(f"{r['commit']}:{TRAINING_FILE}") + "\n") for r in kept[1:]]
    scores = FreshScores(workdir, args.seeds, name=f"{tag}.scores.json", kernels_from=root)
    scores.kernel_seed = kernel_key(start.encode())
    keep_seeds = min(args.keep_seeds, args.seeds)
    if args.arm == "aa" and not keeps:
        # nothing kept, nothing to re-score: the start (the reference too) is the baseline's runs
        runs = results[0].get("runs") or [results[0]["val_bpb"]]
        start_fresh = ref_fresh = dict(enumerate(runs))
        kept_rows, best_fresh = [], start_fresh
    else:
        files = [("start", start, args.seeds)] + ([] if args.arm == "aa" else [("reference", reference, keep_seeds)])
        files += [(f"keep {r['exp']}", text, args.seeds if r is keeps[-1][0] else keep_seeds) for r, text in keeps]
        score_in_rounds(scores, files)
        start_fresh = scores.of(start, "start")
        ref_fresh = start_fresh if args.arm == "aa" else scores.of(reference, "reference", keep_seeds)
        kept_rows, best_fresh = rescore_keeps(scores, keeps, start_fresh, keep_seeds)
    precise = sum(k["beats_parent"] for k in kept_rows)
    start_mean, ref_mean, best_mean = (mean(f.values()) for f in (start_fresh, ref_fresh, best_fresh))
    gap = start_mean - ref_mean
    recovered = (start_mean - best_mean) / gap if args.arm != "aa" and gap > 0 else None
    summary = {
        "arm": args.arm, "agent": "comment-only" if args.arm == "aa" else args.agent, "handicap": handicaps,
        "rule": rule, "experiments": len(results) - 1, "keeps": len(kept) - 1,
        "keep_precision": precise / (len(kept) - 1) if len(kept) > 1 else None,
        "start": start_mean, "reference": ref_mean, "best": best_mean,
        "start_sd": statistics.stdev(list(start_fresh.values())) if len(start_fresh) > 1 else None,
        "gap_recovered": recovered, "kept": kept_rows,
        "reruns": sum(r.get("reruns", 0) for r in results[1:]),
        "loop_minutes": round(loop_minutes, 1), "minutes": round(before + (time.time() - t0) / 60, 1),
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
    }
    with open(workdir / "research.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    return summary


def score_in_rounds(scores: FreshScores, files: list[tuple[str, str, int]]) -> None:
    """Fresh seeds of (label, training file, seeds) files a round at a time: seed 1000 of every
    file, then seed 1001 of those that want it, and so on, so that the files compared with
    each other (a keep with its parent, the best with the start and the reference) ran minutes
    apart. The box's speed drifts within an hour by more than the gaps measured here (the
    start's 4 fresh runs made 117-126 steps at 14:00 on 2026-12-07, the same file's loop runs
    153 steps twenty minutes later)."""
    for j in range(max((n for _, _, n in files), default=0)):
        for label, text, n in files:
            if j < n:
                scores.of(text, label, j + 1)


def rescore_keeps(scores: FreshScores, keeps: list[tuple[dict, str]], start_fresh: dict[int, float],
                  keep_seeds: int) -> tuple[list[dict], dict[int, float]]:
    """Fresh-seed scores of each kept commit ((ledger record, training file) in order) against its
    parent's; returns a row per keep and the best's {seed: val_bpb}. The last keep, the best,
    gets the full seed count (the gap recovered is measured on it), the others `keep_seeds`."""
    parent_fresh, rows = start_fresh, []
    for r, text in keeps:
        fresh = scores.of(text, f"keep {r['exp']}", None if r is keeps[-1][0] else keep_seeds)
        paired = sorted(fresh.keys() & parent_fresh.keys())
        gain = mean(parent_fresh[s] - fresh[s] for s in paired)
        rows.append({"exp": r["exp"], "description": r["description"], "loop_value": r["val_bpb"],
                     "fresh_mean": mean(fresh.values()), "fresh_seeds": len(fresh), "paired_gain": gain,
                     "paired_seeds": len(paired), "beats_parent": gain > 0})
        parent_fresh = fresh
    return rows, parent_fresh


def active_minutes(ledger) -> float:
    """Minutes the arm's loop ran so far: from each session record to the last record before
    the next one (the time between an interruption and its resume does not count)."""
    records = ledger.records()
    starts = [i for i, r in enumerate(records) if r["event"] == "session"] + [len(records)]
    return sum(records[j - 1]["time"] - records[i]["time"] for i, j in zip(starts, starts[1:])) / 60


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end"


def report(s: dict) -> str:
    rec = f"{100 * s['gap_recovered']:.0f}%" if s["gap_recovered"] is not None else "-"
    prec = f"{s['keep_precision']:.2f}" if s["keep_precision"] is not None else "-"
    rescored = s["arm"] != "aa" or s["keeps"]
    means = "fresh-seed means" if rescored else "means of the baseline's runs (nothing kept, nothing re-scored)"
    lines = [f"arm {s['arm']} ({s['rule']} rule, agent {s['agent']}, handicap {'+'.join(s['handicap'])}): "
             f"{s['experiments']} experiments, {s['keeps']} keeps, {s['reruns']} re-runs, {s['minutes']} min",
             f"  {means}: start {s['start']:.4f}, reference {s['reference']:.4f}, best {s['best']:.4f}"
             f"; gap recovered {rec}; keep precision {prec}"]
    for k in s["kept"]:
        lines.append(f"  keep {k['exp']}: {k['description']}: loop {k['loop_value']:.4f}, fresh {k['fresh_mean']:.4f}"
                     f" on {k['fresh_seeds']} seeds; {k['paired_gain']:+.4f} against its parent on the"
                     f" {k['paired_seeds']} seeds both ran ({'beats' if k['beats_parent'] else 'does not beat'} it)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--arm", choices=("noise", "greedy", "aa"), default="noise")
    p.add_argument("--agent", default="hparam", help="the offline agent (hparam or hparam-tpe)")
    p.add_argument("--handicap", default="lr", help="comma-separated: lr, warmdown, depth")
    p.add_argument("--experiments", type=int, default=12)
    p.add_argument("--seeds", type=int, default=4, help="fresh seeds of the start and the best")
    p.add_argument("--keep-seeds", type=int, default=2,
                   help="fresh seeds of the reference and of each keep before the best (a keep's precision is judged "
                        "on the seeds it shares with its parent)")
    p.add_argument("--reruns", type=int, default=DEFAULT_RERUNS)
    p.add_argument("--noise-runs", type=int, default=4,
                   help="baseline runs of the start that measure the loop's noise floor (the runner's default is 5)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--profile", default="cpu", help="cpu (the benchmark); smoke only checks that the script runs")
    p.add_argument("--resume", action="store_true",
                   help="continue the arm's interrupted loop in --workdir (its minutes add up) instead of starting over")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("AUTORESEARCH_CACHE")
                                                         or Path.home() / ".cache" / "autoresearch") / "research-bench")
    args = p.parse_args(argv)
    os.environ["AUTORESEARCH_PROFILE"] = args.profile
    os.environ["AUTORESEARCH_DATASET"] = "builtin"
    args.workdir.mkdir(parents=True, exist_ok=True)
    summary = run_arm(args, args.workdir)
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
