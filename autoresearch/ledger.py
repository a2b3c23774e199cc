"""The record of a run: a JSON-lines ledger (source of truth) and results.tsv (upstream's view).

Both live untracked in the repository root. Every append is one `os.write` of a whole
line followed by `fsync`, so a `kill -9` leaves either the full line or none of it (a torn
last line, which only a power cut could produce, is dropped by `repair`). The ledger is
written first; results.tsv is a projection of the ledger's result records and is rebuilt
from it on resume, which is what makes "every experiment exactly once" hold.

Ledger events (all carry `time` and `tag`):
  session  a run started or resumed (backend, agent, model, profile, protected-file hashes)
  start    an experiment is about to run: exp, commit, parent (the best commit), description
  spawn    the trainer process started: exp, pgid
  result   an experiment finished: exp, commit, val_bpb, memory_gb, status, description,
           cost_usd (the agent's spend), judge_cost_usd (the rubric judge's, general mode),
           curve (the run's [step, loss, tok/s, elapsed s] rows), reason (why it crashed), ...
  agent_cost  spend of an agent call that produced no run (outage, no edit)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

TSV_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")
TSV_HEADER = "\t".join(TSV_COLUMNS) + "\n"
STATUSES = ("keep", "discard", "crash", "invalid")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LedgerWriteError(OSError):
    """A record could not be written whole (a full disk); the file is as it was before."""


def append_line(path: Path, line: str) -> None:
    """Append one line durably: the whole line, then fsync (and the folder if the file is
    new). `os.write` may write only part of it (a full disk): keep writing the rest; if the
    disk refuses, cut the partial line off again and raise LedgerWriteError, so the file
    never holds half a record for the next one to be glued onto."""
    new = not path.exists()
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = os.fstat(fd).st_size
    try:
        written = 0
        try:
            while written < len(data):
                n = os.write(fd, data[written:])
                if n <= 0:
                    raise OSError(28, "No space left on device")
                written += n
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                pass
            raise LedgerWriteError(e.errno, f"could not write to {path} ({e.strerror or e}): free disk space, "
                                            "then continue with `autoresearch run --resume`; nothing logged "
                                            "before is lost") from None
    finally:
        os.close(fd)
    if new:
        _fsync_dir(path.parent)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def clean_description(text: str) -> str:
    """One line, no tabs: the description column of results.tsv."""
    text = " ".join(str(text).split())
    return text[:200] if text else "(no description)"


def tsv_row(result: dict) -> str:
    val = result.get("val_bpb")
    mem = result.get("memory_gb")
    return "\t".join([
        result.get("commit_short") or "-------",
        f"{val:.6f}" if isinstance(val, (int, float)) else "0.000000",
        f"{mem:.1f}" if isinstance(mem, (int, float)) else "0.0",
        result["status"],
        clean_description(result.get("description", "")),
    ]) + "\n"


class Ledger:
    def __init__(self, repo_root: Path, tag: str):
        self.root = Path(repo_root)
        self.tag = tag
        self.path = self.root / "ledger.jsonl"
        self.tsv_path = self.root / "results.tsv"
        self._cache: list[dict] = []
        self._offset = 0

    # -- reading ---------------------------------------------------------------------------
    def all_records(self) -> list[dict]:
        """Every complete record, all tags. Only bytes appended since the last call are
        parsed, so the cost per experiment does not grow with the length of the run."""
        if not self.path.exists():
            self._cache, self._offset = [], 0
            return []
        size = self.path.stat().st_size
        if size < self._offset:          # replaced or truncated (repair): read it again
            self._cache, self._offset = [], 0
        if size > self._offset:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(size - self._offset)
            complete = data[: data.rfind(b"\n") + 1]   # a torn last line waits for `repair`
            for line in complete.splitlines():
                try:
                    self._cache.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            self._offset += len(complete)
        return list(self._cache)

    def records(self, event: str | None = None) -> list[dict]:
        return [r for r in self.all_records()
                if r.get("tag") == self.tag and (event is None or r.get("event") == event)]

    def results(self) -> list[dict]:
        return self.records("result")

    def open_experiments(self) -> list[dict]:
        """The last `start` record of each experiment that has no `result` yet (cut short; a
        wave of parallel workers leaves several), in experiment order."""
        done = {r["exp"] for r in self.results()}
        starts = {r["exp"]: r for r in self.records("start") if r["exp"] not in done}
        return [starts[e] for e in sorted(starts)]

    def open_experiment(self) -> dict | None:
        """The last experiment in flight, or None."""
        starts = self.open_experiments()
        return starts[-1] if starts else None

    def spawned_pgid(self, exp: int) -> int | None:
        pgids = [r["pgid"] for r in self.records("spawn") if r.get("exp") == exp]
        return pgids[-1] if pgids else None

    def best(self) -> dict | None:
        """The kept result with the lowest val_bpb (ties: the earliest)."""
        kept = [r for r in self.results() if r["status"] == "keep"]
        # general mode may maximise a metric: such results carry direction "max"
        return min(kept, key=lambda r: -r["val_bpb"] if r.get("direction") == "max" else r["val_bpb"]) if kept else None

    def next_exp(self) -> int:
        used = [r["exp"] for r in self.records() if "exp" in r]
        return max(used) + 1 if used else 0

    def spent_usd(self) -> float:
        """API spend: each result's agent cost and rubric-judge cost, plus the cost of
        proposals that produced no run."""
        return sum((r.get("cost_usd") or 0.0) + (r.get("judge_cost_usd") or 0.0) for r in self.records()
                   if r.get("event") in ("result", "agent_cost"))

    # -- writing ---------------------------------------------------------------------------
    def append(self, event: str, **fields) -> dict:
        record = {"event": event, "time": time.time(), "tag": self.tag, **fields}
        append_line(self.path, json.dumps(record, sort_keys=False) + "\n")
        return record

    def write_result(self, **fields) -> dict:
        """Ledger first, then results.tsv: a kill between the two is healed by `rebuild_tsv`."""
        if fields["status"] not in STATUSES:
            raise ValueError(f"unknown status {fields['status']!r}")
        if any(r["exp"] == fields["exp"] for r in self.results()):
            raise RuntimeError(f"experiment {fields['exp']} already has a result")
        record = self.append("result", **fields)
        if not self.tsv_path.exists():
            append_line(self.tsv_path, TSV_HEADER)
        append_line(self.tsv_path, tsv_row(record))
        return record

    def repair(self) -> list[str]:
        """Drop a torn last line and set aside lines that are not JSON records (in
        ledger.corrupt.jsonl, nothing deleted). Returns one note per change ([]: intact)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop() if lines else b""        # after the last newline: b"" when intact
        good, bad = [], []
        for line in lines:
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            (good if ok else bad).append(line)
        notes = []
        if torn:
            notes.append("dropped a torn last line")
            bad.append(torn)
        if not bad:
            return []
        if len(bad) > (1 if torn else 0):
            notes.append(f"set aside {len(bad) - (1 if torn else 0)} corrupt line(s)")
        aside = self.path.with_name("ledger.corrupt.jsonl")
        with open(aside, "ab") as f:
            f.write(b"".join(line + b"\n" for line in bad))
        write_atomic(self.path, b"".join(line + b"\n" for line in good).decode(errors="replace"))
        self._cache, self._offset = [], 0
        return [f"{n} of ledger.jsonl (kept in {aside.name})" for n in notes]

    def expected_tsv(self) -> str:
        return TSV_HEADER + "".join(tsv_row(r) for r in sorted(self.results(), key=lambda r: r["exp"]))

    def rebuild_tsv(self) -> bool:
        """Make results.tsv exactly this tag's results. Returns whether it had to change."""
        want = self.expected_tsv()
        have = self.tsv_path.read_text() if self.tsv_path.exists() else None
        if have == want:
            return False
        write_atomic(self.tsv_path, want)
        return True
