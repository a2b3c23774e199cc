"""`autoresearch` command line: run, status, report."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from . import gitops
from .agents import AGENTS, default_agent_name, make_agent
from .ledger import Ledger
from .trainer import BACKENDS, SetupError, Trainer, detect_backend

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
"""


def default_tag() -> str:
    return time.strftime("%b%d").lower()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoresearch", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-C", "--repo", default=".", help="project checkout to work in (default: current directory)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,status,report}")

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
                   help="never start an experiment that could take the agent's spend past USD")
    r.add_argument("--max-fix-attempts", type=int, default=2, metavar="N",
                   help="fix attempts the agent gets for a crashed run before it is logged as crash (default 2)")
    r.add_argument("--max-turns", type=int, default=30, help="agent turns per experiment (default 30)")
    r.add_argument("--resume", action="store_true",
                   help="continue an existing run after a crash or kill: logs the unfinished experiment as "
                        "a crash, resets to the best kept commit and goes on")

    s = sub.add_parser("status", help="where a run stands: best result, counts, spend, experiment in flight")
    s.add_argument("--tag", default=None, help="run to show (default: the current or most recent run)")

    rep = sub.add_parser("report", help="write progress.png and print the table of results")
    rep.add_argument("--tag", default=None, help="run to report (default: the current or most recent run)")
    rep.add_argument("--output", default="progress.png", help="image path (default: progress.png)")
    return p


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


def cmd_run(args) -> int:
    from .runner import RunConfig, Runner, run
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
    else:
        tag = args.tag or default_tag()
        agent_name = args.agent or default_agent_name()
        model = args.model
    agent = make_agent(agent_name, model=model, max_turns=args.max_turns)
    config = RunConfig(tag=tag, backend=backend, max_experiments=args.max_experiments, max_spend=args.max_spend,
                       max_fix_attempts=args.max_fix_attempts)
    if os.environ.get("AUTORESEARCH_OUTAGE_WAIT"):
        config.outage_wait_s = float(os.environ["AUTORESEARCH_OUTAGE_WAIT"])
    runner = Runner(root, config, agent, Trainer.for_backend(backend))
    return run(runner, resume=args.resume)


def cmd_status(args) -> int:
    from .report import status_text
    repo = gitops.open_repo(args.repo)
    root = gitops.root(repo)
    print(status_text(Ledger(root, resolve_tag(repo, root, args.tag)), repo))
    return 0


def cmd_report(args) -> int:
    from .report import draw_progress, summary_table
    repo = gitops.open_repo(args.repo)
    root = gitops.root(repo)
    ledger = Ledger(root, resolve_tag(repo, root, args.tag))
    results = ledger.results()
    if not results:
        raise SetupError(f"run {ledger.tag!r} has no results yet.")
    print(summary_table(results))
    out = Path(args.output)
    out = out if out.is_absolute() else root / out
    draw_progress(results, out, title=f"autoresearch/{ledger.tag}")
    print(f"\nWrote {out}")
    return 0


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return {"run": cmd_run, "status": cmd_status, "report": cmd_report}[args.command](args)
    except (SetupError, gitops.GitError) as e:
        print(f"autoresearch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nautoresearch: interrupted; continue with `autoresearch run --resume`.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
