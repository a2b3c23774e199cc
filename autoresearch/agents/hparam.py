"""The offline agent: a coordinate pattern search over the training file's constants.

No key, no network. It edits only module-level constants written as plain numeric
literals (`MATRIX_LR = 0.04`) in the file's hyperparameter block: after a
`# Hyperparameters` comment when there is one (upstream's layout), else anywhere at module
level. These are the knobs a trainer in Karpathy's style exposes.

Search strategy (deterministic given the run's history, so a resumed run continues
the same search):
  * Tunable constants: every float literal, plus the integer `DEPTH`; in file order.
    Integers other than DEPTH (batch sizes, sequence lengths) are left alone because
    they are tied together by divisibility asserts.
  * A move multiplies a float by a step factor (up) or divides by it (down); fractions
    (names ending in RATIO or FRAC) stay in [0, 0.95], and zero moves up to 0.05. DEPTH
    moves by one layer (never below 1).
  * After a keep, the same constant moves again in the same direction (follow the slope).
    After a discard or crash of an up move, the same constant tries down once (unless
    it had just been kept going up: below is where it came from). Otherwise the search
    goes on with the next constant, starting upwards.
  * Each full sweep over all constants without a keep shrinks the step:
    factor 2, then 2**0.5, 2**0.25, ... (finer search around the optimum). The first step
    is an octave because on the cpu profile a x1.5 learning-rate move changed val_bpb by
    about one noise sigma, too little to confirm in three runs (bench/RESULTS.md).
  * A move whose resulting file was already tried in this run is skipped: the runner
    records the content hash (git blob id) of every scored file, and this agent records the
    hash of every file it proposed (crashed and identical ones included). When every move
    at the current step was tried, the step shrinks as after a sweep.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from . import Agent, AgentFailed, Context, Proposal

_CONST = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)(?P<eq>\s*=\s*)(?P<value>[-+]?(?:\d[\d_]*\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?))(?P<rest>\s*(?:#.*)?)$")
TUNABLE_INTS = ("DEPTH",)
BASE_FACTOR = 2.0
MAX_SHRINKS = 8          # 2 ** (0.5 ** 8) ~ 1.0027: below that, 4 significant digits stop moving


_BLOCK_MARKER = re.compile(r"^#.*\bhyperparameters\b", re.IGNORECASE)


def _block_start(lines: list[str]) -> int:
    """First line of the hyperparameter block: after a `# Hyperparameters` comment if the
    file has one (upstream's layout), else the top of the file."""
    for i, line in enumerate(lines):
        if _BLOCK_MARKER.match(line):
            return i + 1
    return 0


def read_constants(text: str) -> list[tuple[str, float | int, int]]:
    """(name, value, line index) of the tunable constants, in file order: module-level
    (column 0) numeric literals in the hyperparameter block, first assignment of each name."""
    lines = text.splitlines()
    found, seen = [], set()
    for i in range(_block_start(lines), len(lines)):
        m = _CONST.match(lines[i])
        if not m or m["name"] in seen:
            continue
        seen.add(m["name"])
        raw = m["value"].replace("_", "")
        if any(c in raw for c in ".eE"):
            found.append((m["name"], float(raw), i))
        elif m["name"] in TUNABLE_INTS:
            found.append((m["name"], int(raw), i))
    return found


def set_constant(text: str, name: str, value) -> str:
    lines = text.splitlines(keepends=True)
    for i in range(_block_start([l.rstrip("\n") for l in lines]), len(lines)):
        line = lines[i]
        m = _CONST.match(line.rstrip("\n"))
        if m and m["name"] == name:
            ending = "\n" if line.endswith("\n") else ""
            lines[i] = f"{m['name']}{m['eq']}{format_value(value)}{m['rest']}{ending}"
            return "".join(lines)
    raise KeyError(name)


def format_value(value) -> str:
    if isinstance(value, int):
        return str(value)
    s = f"{value:.4g}"
    return s if any(c in s for c in ".e") else s + ".0"


def is_fraction(name: str) -> bool:
    return name.endswith(("RATIO", "FRAC"))


def moved(name: str, value, direction: int, factor: float):
    """The value after one step in `direction` (+1 up, -1 down), or None if it cannot move."""
    if isinstance(value, int):
        new = value + direction
        return new if new >= 1 else None
    if value == 0.0:
        return 0.05 if direction > 0 else None
    new = value * factor if direction > 0 else value / factor
    if is_fraction(name):
        new = min(max(new, 0.0), 0.95)
    new = float(format_value(new))
    return None if new == value else new


def blob_hash(text: str) -> str:
    """git's blob id of a file with this content (what `git hash-object` prints)."""
    data = text.encode()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tried_blobs(history: list[dict]) -> set[str]:
    """Content hashes of every training file this run has already tried: the runner's
    `blob` of each scored result and the offline agents' own record of each proposal."""
    tried = set()
    for r in history:
        if r.get("blob"):
            tried.add(r["blob"])
        meta = r.get("agent_meta")
        for own in (meta.values() if isinstance(meta, dict) else ()):
            if isinstance(own, dict) and own.get("blob"):
                tried.add(own["blob"])
    return tried


class HparamAgent(Agent):
    name = "hparam"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _plan(self, names: list[str], history: list[dict]) -> list[tuple[str, int]]:
        """Moves to try, best first: continue after a keep, reverse after a failed up move,
        else the next constant in order."""
        moves = [r["agent_meta"]["hparam"] for r in history
                 if isinstance(r.get("agent_meta"), dict) and "hparam" in r["agent_meta"]]
        statuses = [r["status"] for r in history
                    if isinstance(r.get("agent_meta"), dict) and "hparam" in r["agent_meta"]]
        plan = []
        if moves:
            last, status = moves[-1], statuses[-1]
            prev = (moves[-2], statuses[-2]) if len(moves) > 1 else (None, None)
            came_from_below = (prev[0] is not None and prev[0]["name"] == last["name"]
                               and prev[0]["direction"] > 0 and prev[1] == "keep")
            if last["name"] in names:
                if status == "keep":
                    plan.append((last["name"], last["direction"]))
                elif last["direction"] > 0 and not came_from_below:
                    plan.append((last["name"], -1))
                start = (names.index(last["name"]) + 1) % len(names)
            else:
                start = 0
        else:
            start = self.seed % len(names)
        plan += [(names[(start + k) % len(names)], +1) for k in range(len(names))]
        plan += [(names[(start + k) % len(names)], -1) for k in range(len(names))]
        return plan

    def _factor(self, history: list[dict], n_names: int) -> float:
        # Count hparam moves since the last keep; each full sweep (up and down for every
        # constant) without a keep halves the step in log space.
        since_keep = 0
        for r in history:
            if isinstance(r.get("agent_meta"), dict) and "hparam" in r["agent_meta"]:
                since_keep = 0 if r["status"] == "keep" else since_keep + 1
        sweeps = since_keep // max(1, 2 * n_names)
        return BASE_FACTOR ** (0.5 ** sweeps)

    def propose(self, ctx: Context) -> Proposal:
        path = ctx.training_path
        text = path.read_text()
        constants = read_constants(text)
        if not constants:
            raise AgentFailed(f"hparam agent: no numeric constants in {ctx.training_file} "
                              "(expected module-level lines like `MATRIX_LR = 0.04`).")
        values = {name: value for name, value, _ in constants}
        names = [name for name, _, _ in constants]
        tried = tried_blobs(ctx.history + list(ctx.in_flight)) | {blob_hash(text)}
        factor = self._factor(ctx.history, len(names))
        plan = self._plan(names, ctx.history)
        for _ in range(MAX_SHRINKS + 1):
            for name, direction in plan:
                new = moved(name, values[name], direction, factor)
                if new is None:
                    continue
                candidate = set_constant(text, name, new)
                blob = blob_hash(candidate)
                if blob in tried:
                    continue      # this exact file already ran (or crashed): next move
                path.write_text(candidate)
                old = format_value(values[name])
                return Proposal(
                    description=f"{name} {old} -> {format_value(new)}",
                    meta={"hparam": {"name": name, "old": values[name], "new": new,
                                     "direction": direction, "factor": factor, "blob": blob}})
            factor = factor ** 0.5    # every move at this step was tried: a finer step
        raise AgentFailed("hparam agent: no constant can move to a file not tried yet.")
