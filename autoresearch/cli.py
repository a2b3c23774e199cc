"""`autoresearch` command line: run, noise, status, report, doctor."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import git

from . import gitops
from .agents import AGENTS, default_agent_name, make_agent
from .decide import DEFAULT_RERUNS
from .ledger import Ledger, LedgerWriteError
from .trainer import BACKENDS, SetupError, Trainer, confine, detect_backend, harness_info

DESCRIPTION = """Autonomous research on one training file: an agent edits it, the runner trains
for the profile's fixed time budget, reads val_bpb, keeps the change if it beat the best
(the branch advances) or resets it (git reset --hard). Results go to results.tsv and
ledger.jsonl (untracked) and the loop survives crashes: rerun with --resume."""

RUN_EPILOG = """agents:
  hparam       offline, no key: a documented pattern search over the constants at the
               top of the training file (the default when ANTHROPIC_API_KEY is unset)
  anthropic    Anthropic Messages API with the text editor tool (needs ANTHROPIC_API_KEY)
  claude-code  headless `claude -p` per experiment (needs Claude Code installed)

examples:
  uv run autoresearch run --agent hparam --max-experiments 20
  uv run autoresearch run --agent anthropic --tag nov26 --max-spend 5
  uv run autoresearch run --resume            # after a crash, Ctrl-C or kill -9
  uv run autoresearch noise --runs 5          # measure the noise floor (else the baseline does)
  uv run autoresearch -C ../target run --agent hparam --scope solver.py --guard "python test_solver.py"
      --metric-cmd "python bench.py" --metric-regex "time_ms: ([0-9.]+)" --direction min
"""


def default_tag() -> str:
    return time.strftime("%b%d").lower()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoresearch", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-C", "--repo", default=".", help="project checkout to work in (default: current directory)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,noise,status,report,doctor}")

    r = sub.add_parser("run", help="run the research loop (baseline first, then experiments)",
                       description="Create branch autoresearch/<tag>, run the baseline, then loop: the agent "
                                   "edits the training file, the runner trains, keeps or reverts.",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--backend", choices=BACKENDS, default=None,
                   help="mlx trains train_mlx.py, cuda trains train.py (default: $AUTORESEARCH_BACKEND, "
                        "else mlx on Apple Silicon, cuda where an NVIDIA GPU and torch are present)")
    r.add_argument("--agent", choices=AGENTS, default=None,
                   help="who proposes edits (default: anthropic if ANTHROPIC_API_KEY is set, else hparam)")
    r.add_argument("--tag", default=None,
                   help="run name; the branch is autoresearch/<tag> (default: today, e.g. nov26; "
                        "with --resume: the current or most recent run)")
    r.add_argument("--model", default=None, help="model id for anthropic / claude-code (checked at start)")
    r.add_argument("--max-experiments", type=int, default=None, metavar="N",
                   help="stop after N experiments on this branch, baseline not counted (default: no limit)")
    r.add_argument("--max-spend", type=float, default=None, metavar="USD",
                   help="never start an experiment that could take the API spend (the agent's, plus the "
                        "rubric judge's with --rubric) past USD")
    r.add_argument("--max-fix-attempts", type=int, default=2, metavar="N",
                   help="fix attempts the agent gets for a crashed run before it is logged as crash (default 2)")
    r.add_argument("--max-turns", type=int, default=30, help="agent turns per experiment (default 30)")
    r.add_argument("--resume", action="store_true",
                   help="continue an existing run after a crash or kill: logs the unfinished experiment as "
                        "a crash, resets to the best kept commit and goes on")

    add_decision_args(r)
    add_metric_args(r)
    add_sandbox_args(r)

    n = sub.add_parser("noise", help="measure the noise floor: the current training file run K times with seeds "
                                     "AUTORESEARCH_SEED+i; mean and spread go to the ledger",
                       description="Run the current training file (or --metric-cmd) K times with different seeds "
                                   "and record the mean and standard deviation in ledger.jsonl; the noise-aware "
                                   "keep rule of `run` uses the latest comparable record.")
    n.add_argument("--runs", type=int, default=None, metavar="K", help="number of runs (default 5)")
    n.add_argument("--backend", choices=BACKENDS, default=None, help="as for run")
    n.add_argument("--tag", default=None, help="ledger tag to file the record under (default: current run or today)")
    add_metric_args(n)
    add_sandbox_args(n)

    s = sub.add_parser("status", help="where a run stands: best result, counts, spend, experiment in flight")
    s.add_argument("--tag", default=None, help="run to show (default: the current or most recent run)")

    rep = sub.add_parser("report", help="write progress.png and print the table of results")
    rep.add_argument("--tag", default=None, help="run to report (default: the current or most recent run)")
    rep.add_argument("--output", default="progress.png", help="image path (default: progress.png)")
    rep.add_argument("--html", nargs="?", const="report.html", default=None, metavar="PATH",
                     help="write the morning report instead of the image: one self-contained HTML page "
                          "(default PATH: report.html beside the ledger)")
    rep.add_argument("--watch", action="store_true",
                     help="with --html: rewrite the page after every experiment; the open page reloads itself")

    doc = sub.add_parser("doctor", help="check this machine: device, MLX/torch, data, git, agents, sandbox, disk",
                         description="One row per need, ok / warning / missing with the command that fixes it. "
                                     "Exit 0 when the main job can run, 1 when it cannot.")
    doc.add_argument("--backend", choices=BACKENDS, default=None, help="as for run")
    doc.add_argument("--online", action="store_true",
                     help="also check the agents' keys with one tiny request each")
    return p


def add_decision_args(r) -> None:
    g = r.add_argument_group("keep rule")
    g.add_argument("--decide", choices=("noise", "greedy"), default=None,
                   help="noise (default): a result better than the best is re-run with new seeds and kept "
                        "only if the mean wins by more than the noise floor allows; greedy: upstream's "
                        "strictly-lower rule")
    g.add_argument("--confidence", type=float, default=0.95,
                   help="one-sided confidence a keep needs under --decide noise (default 0.95)")
    g.add_argument("--reruns", type=int, default=DEFAULT_RERUNS, metavar="N",
                   help="runs that confirm a candidate better than the best: the best's and the candidate's "
                        f"in turn, fewer once it is out of reach or a clear win (default {DEFAULT_RERUNS}; 0: one run decides)")
    g.add_argument("--noise-runs", type=int, default=5, metavar="K",
                   help="baseline runs that measure the noise floor when the ledger has none (default 5)")


def add_sandbox_args(r) -> None:
    g = r.add_argument_group("parallel runs on Ray (uv sync --extra ray)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="train N candidates at once on a local Ray instance (waves; see README 'Parallel runs')")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join an existing Ray cluster (e.g. 10.0.0.5:6379) instead of starting a local one")
    g = r.add_argument_group("sandbox (every run: bubblewrap on Linux, sandbox-exec on macOS)")
    g.add_argument("--require-sandbox", action="store_true",
                   help="refuse to start when no sandbox can run here (default: run unsandboxed and say so)")
    g.add_argument("--allow-network", action="store_true",
                   help="let the training file reach the network (default: no network inside the sandbox)")


def add_metric_args(r) -> None:
    g = r.add_argument_group("general mode (any target a command can score)")
    g.add_argument("--metric-cmd", default=None, metavar="CMD", help="shell command whose output holds the score")
    g.add_argument("--metric-regex", default=None, metavar="RE",
                   help="regex for the score in CMD's output (its group, last match), e.g. 'time_ms: ([0-9.]+)'")
    g.add_argument("--direction", choices=("min", "max"), default="min", help="lower or higher is better")
    g.add_argument("--scope", nargs="+", default=None, metavar="FILE", help="the file the agent may edit")
    g.add_argument("--guard", default=None, metavar="CMD", help="command that must pass (exit 0) for a keep")
    g.add_argument("--rubric", default=None, metavar="FILE",
                   help="3-6 yes/no criteria scored by an LLM judge (Anthropic API); score = number of yes")
    g.add_argument("--judge-model", default=None, help="model of the rubric judge (default claude-sonnet-4-6)")


def metric_trainer(args, last_harness: dict | None = None):
    """The general-mode Trainer from the flags (or, on --resume, from the last session), or None."""
    from .metric import MetricTrainer
    h = last_harness if (last_harness or {}).get("mode") == "metric" else {}
    cmd = args.metric_cmd or h.get("metric_cmd")
    rubric = args.rubric or h.get("rubric_file")
    if not (cmd or rubric or args.scope):
        return None
    trainer = MetricTrainer.build(cmd, args.metric_regex or h.get("metric_regex"),
                                  args.direction if args.metric_cmd or not h else h.get("direction", "min"),
                                  args.scope or h.get("scope") or [], guard=args.guard or h.get("guard"),
                                  rubric=rubric, judge_model=args.judge_model or h.get("judge_model"))
    return trainer


def resolve_tag(repo, root: Path, tag: str | None) -> str:
    if tag:
        return tag
    branch = gitops.current_branch(repo)
    if branch and branch.startswith(gitops.BRANCH_PREFIX):
        return branch[len(gitops.BRANCH_PREFIX):]
    sessions = [r for r in Ledger(root, "").all_records() if r.get("event") == "session"]
    if sessions:
        return sessions[-1]["tag"]
    raise SetupError("no run found: start one with `autoresearch run`, or name it with --tag.")


def check_run_args(args) -> None:
    """Every flag and environment setting of `run`, checked before anything happens."""
    from .noise import base_seed
    from .trainer import timeout_for
    for name, value, low in (("--max-experiments", args.max_experiments, 0), ("--max-fix-attempts", args.max_fix_attempts, 0),
                             ("--max-turns", args.max_turns, 1), ("--reruns", args.reruns, 0),
                             ("--noise-runs", args.noise_runs, 1)):
        if value is not None and value < low:
            raise SetupError(f"{name} {value}: must be at least {low}.")
    if args.max_spend is not None and not args.max_spend > 0:
        raise SetupError(f"--max-spend {args.max_spend}: give a positive amount in USD, e.g. --max-spend 5.")
    if not 0.5 <= args.confidence < 1:
        raise SetupError(f"--confidence {args.confidence}: must be in [0.5, 1), e.g. 0.95.")
    if args.tag is not None:
        check_tag(args.tag)
    if args.workers is not None and args.workers < 1:
        raise SetupError(f"--workers {args.workers}: must be at least 1.")
    if (args.workers or args.ray_address) and args.rubric:
        raise SetupError("--rubric does not run on workers (the judge needs the runner's API key): drop --workers.")
    base_seed()
    timeout_for(1.0)


def check_tag(tag: str) -> None:
    ok = subprocess.run(["git", "check-ref-format", "--branch", gitops.BRANCH_PREFIX + tag],
                        capture_output=True).returncode == 0
    if not ok or not tag or any(c.isspace() for c in tag):
        raise SetupError(f"--tag {tag!r} is not a valid branch name part: use letters, digits, '-', '_' or '.', "
                         "e.g. --tag dec01.")


def cmd_run(args) -> int:
    from .runner import RunConfig, Runner, run
    check_run_args(args)
    repo = gitops.open_repo(args.repo)
    root = gitops.root(repo)
    backend = args.backend or detect_backend()
    if args.resume:
        tag = resolve_tag(repo, root, args.tag)
        sessions = Ledger(root, tag).records("session")
        last = sessions[-1] if sessions else {}
        agent_name = args.agent or last.get("agent") or default_agent_name()
        backend = args.backend or last.get("backend") or backend
        model = args.model or last.get("model")
        last_harness = last.get("harness") or {}
    else:
        last_harness = {}
        tag = args.tag or default_tag()
        agent_name = args.agent or default_agent_name()
        model = args.model
    from .policy import Decisions
    agent = make_agent(agent_name, model=model, max_turns=args.max_turns)
    trainer = metric_trainer(args, last_harness)
    if trainer is not None:
        trainer.check()
        backend = "metric"
    decide = args.decide or (last_harness.get("decide") or {}).get("rule") or "noise"
    decisions = Decisions(decide, confidence=args.confidence, reruns=args.reruns, noise_runs=args.noise_runs)
    config = RunConfig(tag=tag, backend=backend, max_experiments=args.max_experiments, max_spend=args.max_spend,
                       max_fix_attempts=args.max_fix_attempts, require_sandbox=args.require_sandbox,
                       allow_network=args.allow_network)
    if os.environ.get("AUTORESEARCH_OUTAGE_WAIT"):
        config.outage_wait_s = float(os.environ["AUTORESEARCH_OUTAGE_WAIT"])
    trainer = trainer or Trainer.for_backend(backend)
    pool = None
    if args.workers or args.ray_address:
        from .workers import Pool, RemoteTrainer     # Ray is imported only here
        pool = Pool(args.workers, args.ray_address, backend)
        trainer = RemoteTrainer.wrap(trainer, pool)
    runner = Runner(root, config, agent, trainer, decisions=decisions, pool=pool)
    return run(runner, resume=args.resume)     # run() shuts the pool down


def cmd_noise(args) -> int:
    from .noise import cmd_noise as measure_noise
    repo = gitops.open_repo(args.repo)
    root = gitops.root(repo)
    trainer = metric_trainer(args)
    if trainer is None:
        trainer = Trainer.for_backend(args.backend or detect_backend())
    else:
        trainer.check()
    harness = trainer.harness(root) if hasattr(trainer, "harness") else harness_info(root)
    confine(trainer, harness, require_sandbox=args.require_sandbox, allow_network=args.allow_network)
    try:
        tag = resolve_tag(repo, root, args.tag)
    except SetupError:
        tag = default_tag()
    gitops.exclude_run_outputs(repo)
    return measure_noise(args, trainer, harness, Ledger(root, tag), root)


def cmd_status(args) -> int:
    from .report import status_text
    repo = gitops.open_repo(args.repo)
    root = gitops.root(repo)
    print(status_text(Ledger(root, resolve_tag(repo, root, args.tag)), repo))
    return 0


def cmd_report(args) -> int:
    from .report import draw_progress, metric_of, summary_table
    if args.watch and not args.html:
        raise SetupError("--watch rewrites the HTML report: add --html (e.g. autoresearch report --html --watch).")
    repo = gitops.open_repo(args.repo)
    root = gitops.root(repo)
    ledger = Ledger(root, resolve_tag(repo, root, args.tag))
    results = ledger.results()
    if not results:
        raise SetupError(f"run {ledger.tag!r} has no results yet.")
    sessions = ledger.records("session")
    name, _ = metric_of((sessions[-1].get("harness") if sessions else None) or {}, results)
    print(summary_table(results, name))
    if args.html:
        from .html_report import watch, write_report
        page = Path(args.html)
        page = page if page.is_absolute() else root / page
        if args.watch:
            watch(ledger, root, page)
        else:
            print(f"\nWrote {write_report(ledger, root, page)}: open it in a browser (file://{page})")
        return 0
    out = Path(args.output)
    out = out if out.is_absolute() else root / out
    draw_progress(results, out, title=f"autoresearch/{ledger.tag}")
    print(f"\nWrote {out}")
    return 0


def cmd_doctor(args) -> int:
    from .doctor import cmd_doctor as diagnose
    root = Path(args.repo).resolve()
    try:
        root = gitops.root(gitops.open_repo(root))
    except gitops.GitError:
        pass           # not a repository: the git row says so
    return diagnose(args, root, args.backend or detect_backend())


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return {"run": cmd_run, "noise": cmd_noise, "status": cmd_status, "report": cmd_report,
                "doctor": cmd_doctor}[args.command](args)
    except (SetupError, gitops.GitError) as e:
        print(f"autoresearch: {e}", file=sys.stderr)
        return 2
    except LedgerWriteError as e:
        print(f"autoresearch: stopped: {e.strerror}", file=sys.stderr)
        return 3
    except (git.GitCommandError, subprocess.CalledProcessError) as e:
        gitcmd = isinstance(e, git.GitCommandError)
        cmd = " ".join(str(c) for c in (e.command if gitcmd else e.cmd))
        err = str(getattr(e, "stderr", None) or "").strip().strip("'").splitlines()
        why = err[-1].strip() if err else f"exit {e.status if gitcmd else e.returncode}"
        print(f"autoresearch: `{cmd}` failed ({why}): fix what it names, then rerun (a started run "
              "continues with --resume).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nautoresearch: interrupted; continue with `autoresearch run --resume`.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
