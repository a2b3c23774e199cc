"""The offline agent backed by a library: Optuna's TPE sampler, ask-and-tell, over the
training file's hyperparameter constants.

No key, no network. The search space is the constants the coordinate agent tunes (hparam.py:
float literals and DEPTH in the hyperparameter block), fixed when the study starts from the
values in the file then: a positive float v ranges over [v/8, 8v] on a log scale, a
fraction (a name ending in RATIO or FRAC) over [0, 0.95], DEPTH over [1, 2 * DEPTH].
Each proposal writes one sampled point (every constant at once) into the file.

The study lives in SQLite beside the ledger (`optuna.db`, one study per run tag), so a
resumed run continues it. Optuna is told only what the runner recorded: the baseline's value,
each experiment's value (the mean of its re-runs when it had any), a crash or invalid run as
a failed trial; a trial the runner never recorded (the run was killed) fails too. The agent
never reads a log or a summary itself.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import Agent, AgentFailed, Context, Proposal
from .hparam import blob_hash, format_value, is_fraction, read_constants, set_constant, tried_blobs

STUDY_FILE = "optuna.db"
LOG_RANGE = 8.0          # a positive float v ranges over [v / 8, 8 v]
STARTUP_TRIALS = 4       # random points before TPE models the results (the baseline counts)
MAX_ASKS = 20            # resampling when a point lands on a file already tried


def search_space(text: str) -> dict[str, list]:
    """{name: [kind, low, high, log]} for the tunable constants of a training file."""
    space = {}
    for name, value, _ in read_constants(text):
        if isinstance(value, int):
            space[name] = ["int", 1, max(2, 2 * value), False]
        elif is_fraction(name):
            space[name] = ["float", 0.0, 0.95, False]
        elif value > 0:
            space[name] = ["float", value / LOG_RANGE, value * LOG_RANGE, True]
    return space


def distributions(space: dict[str, list]) -> dict:
    from optuna.distributions import FloatDistribution, IntDistribution
    return {name: (IntDistribution(low, high) if kind == "int" else FloatDistribution(low, high, log=log))
            for name, (kind, low, high, log) in space.items()}


def _clip(value, kind, low, high):
    value = min(max(value, low), high)
    return int(round(value)) if kind == "int" else float(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class TPEAgent(Agent):
    name = "hparam-tpe"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def check(self) -> None:
        try:
            import optuna  # noqa: F401
        except ImportError:
            from ..trainer import SetupError
            raise SetupError("the hparam-tpe agent needs Optuna: run `uv sync` (it is a project dependency).")

    def _study(self, ctx: Context):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = f"sqlite:///{Path(ctx.repo_root) / STUDY_FILE}"
        sampler = optuna.samplers.TPESampler(seed=self.seed + len(ctx.history), n_startup_trials=STARTUP_TRIALS,
                                             multivariate=True)
        return optuna.create_study(storage=storage, study_name=f"autoresearch/{ctx.tag or 'run'}",
                                   direction="minimize" if ctx.objective.direction == "min" else "maximize",
                                   sampler=sampler, load_if_exists=True)

    def _tell_recorded(self, study, ctx: Context, space: dict) -> None:
        """Tell the study every result the runner has recorded since the last proposal."""
        import optuna
        from optuna.trial import TrialState
        by_trial = {}
        for r in ctx.history:
            meta = r.get("agent_meta")
            if isinstance(meta, dict) and isinstance(meta.get("tpe"), dict):
                by_trial[meta["tpe"]["trial"]] = r
        flying = {c["agent_meta"]["tpe"]["trial"] for c in ctx.in_flight
                  if isinstance((c.get("agent_meta") or {}).get("tpe"), dict)}
        trials = study.get_trials(deepcopy=False)
        if not any(t.user_attrs.get("baseline") for t in trials) and ctx.history:
            base = ctx.history[0]
            if _finite(base.get("val_bpb")):
                values = {name: value for name, value, _ in read_constants(self._baseline_text(ctx))}
                params = {n: _clip(values[n], *space[n][:3]) for n in space if n in values}
                if len(params) == len(space):
                    study.add_trial(optuna.trial.create_trial(
                        params=params, distributions=distributions(space), value=base["val_bpb"],
                        user_attrs={"baseline": True, "exp": base.get("exp", 0)}))
        for t in trials:
            if t.state != TrialState.RUNNING or t.number in flying:   # in flight: asked, told later
                continue
            r = by_trial.get(t.number)
            if r is not None and r.get("status") in ("keep", "discard") and _finite(r.get("val_bpb")):
                study.tell(t.number, r["val_bpb"])
            else:   # a crash, an invalid run, or a run the runner never recorded
                study.tell(t.number, state=TrialState.FAIL)

    def _baseline_text(self, ctx: Context) -> str:
        """The training file as the baseline ran it (from git), else as it is now."""
        import subprocess
        commit = ctx.history[0].get("commit") if ctx.history else None
        if commit:
            out = subprocess.run(["git", "show", f"{commit}:{ctx.training_file}"], cwd=ctx.repo_root,
                                 capture_output=True, text=True)
            if out.returncode == 0:
                return out.stdout
        return ctx.training_path.read_text()

    def propose(self, ctx: Context) -> Proposal:
        from optuna.trial import TrialState
        path = ctx.training_path
        text = path.read_text()
        study = self._study(ctx)
        space = study.user_attrs.get("space")
        if space is None:
            space = search_space(self._baseline_text(ctx) if ctx.history else text)
            if not space:
                raise AgentFailed(f"hparam-tpe agent: no numeric constants in {ctx.training_file} "
                                  "(expected module-level lines like `MATRIX_LR = 0.04`).")
            study.set_user_attr("space", space)
        space = {k: list(v) for k, v in json.loads(json.dumps(space)).items()}
        self._tell_recorded(study, ctx, space)
        current = {name: value for name, value, _ in read_constants(text)}
        missing = [n for n in space if n not in current]
        if missing:
            raise AgentFailed(f"hparam-tpe agent: the training file no longer defines {', '.join(missing)}.")
        tried = tried_blobs(ctx.history + list(ctx.in_flight)) | {blob_hash(text)}
        by_blob = {r["blob"]: r for r in ctx.history if r.get("blob")}
        dists = distributions(space)
        for _ in range(MAX_ASKS):
            trial = study.ask(dists)
            candidate, changes = text, []
            for name, value in trial.params.items():
                value = int(value) if space[name][0] == "int" else float(format_value(value))
                if value != current[name]:
                    candidate = set_constant(candidate, name, value)
                    changes.append(f"{name} {format_value(current[name])} -> {format_value(value)}")
            blob = blob_hash(candidate)
            if blob not in tried:
                path.write_text(candidate)
                return Proposal(description=f"TPE trial {trial.number}: " + ", ".join(changes),
                                meta={"tpe": {"trial": trial.number, "params": trial.params, "blob": blob}})
            earlier = by_blob.get(blob)   # a point whose file already ran: its recorded value
            if earlier is not None and _finite(earlier.get("val_bpb")) and earlier.get("status") in ("keep", "discard"):
                study.tell(trial.number, earlier["val_bpb"])
            else:
                study.tell(trial.number, state=TrialState.FAIL)
        raise AgentFailed(f"hparam-tpe agent: {MAX_ASKS} sampled points were all files already tried.")
