"""The trusted scorer: the number that decides is computed here, not in the training file.

Under the runner, the trainer runs sandboxed and cannot read the validation shard. Its
`prepare.evaluate_bpb` becomes the model side of this protocol: it receives batches of
input tokens and returns logits; this process (started by the runner, never sandboxed,
never importing the training file) holds the rows and their targets, chooses the rows,
their order and count, computes float32 cross-entropy and bits per byte itself, and
prints the authoritative result on its stdout, a pipe only the runner reads.

Transport: a Unix socket inherited by the trainer (fd in $AUTORESEARCH_SCORER_FD) carries
small framed messages; logits move through a shared-memory buffer of two slots (the
trainer fills one while the scorer reads the other), so memory stays bounded whatever the
eval size: the standard profile scores 21M tokens x 8192 logits, ~690 GB of float32.

Causality probes are mixed into the evaluation: for some rows a sibling shares the prefix
up to a random position and carries random tokens after it. Rows, siblings and order are
shuffled with a secret seed, so a sibling may come before its original, in any batch. The
logits of the shared prefix must match: a model that reads future tokens, even only
after its first calls, is refused.

    scorer:  hello-reply {eval_tokens}, then batch {n, T} + int32 tokens, free {slot}, done/refused
    trainer: hello {batch_size}, chunk {slot, n, V} (logits in the slot), batch_done {shape}
"""
from __future__ import annotations

import collections
import json
import math
import mmap
import os
import secrets
import socket
import struct
import sys
import tempfile
import time

import numpy as np

SCORER_FD_ENV = "AUTORESEARCH_SCORER_FD"
CHUNK_BYTES = 64 * 1024 * 1024     # float32 logits per shared-memory slot
SLOTS = 2
AHEAD = 2                          # batches sent before the previous ones are scored
PROBE_FRACTION = 0.02              # causality siblings, as a share of the scored rows...
MIN_PROBES = 8                     # ...but at least this many
# A sibling's prefix logits may differ from its original's by this much, relative to their
# scale: same batch shape and kernels, but another position in the batch.
CAUSALITY_RTOL = 1e-3
_HEADER = struct.Struct("<IQ")


class ProtocolError(RuntimeError):
    """The other side broke the protocol (closed early, sent garbage)."""


# -- framing ----------------------------------------------------------------------------------
def send(sock: socket.socket, msg: dict, payload: bytes | memoryview = b"") -> None:
    head = json.dumps(msg).encode()
    sock.sendall(_HEADER.pack(len(head), len(payload)) + head)
    if len(payload):
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ProtocolError("the other side closed the connection")
        got += k
    return bytes(buf)


def recv(sock: socket.socket, max_payload: int = 1 << 31) -> tuple[dict, bytes]:
    head_len, payload_len = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if head_len > 1 << 20 or payload_len > max_payload:
        raise ProtocolError(f"oversized message ({head_len} + {payload_len} bytes)")
    try:
        msg = json.loads(_recv_exact(sock, head_len))
    except ValueError:
        raise ProtocolError("a message that is not JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message that is not an object")
    return msg, _recv_exact(sock, payload_len) if payload_len else b""


def _shared_buffer(nbytes: int) -> int:
    """An anonymous shared-memory file descriptor of nbytes (memfd on Linux, else an unlinked file)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("autoresearch-logits")
    else:
        fd, path = tempfile.mkstemp(prefix="autoresearch-logits-")
        os.unlink(path)
    os.ftruncate(fd, nbytes)
    return fd


# -- the scorer -------------------------------------------------------------------------------
# -- the arithmetic, on the device where there is one ----------------------------------------
def numpy_math(logits, sel, tgt, probe_vec):
    """(fingerprint of every position, float32 cross-entropy of positions `sel` against `tgt`).
    `logits` is the scorer's own copy and is overwritten."""
    fp = (logits @ probe_vec).astype(np.float64)
    if not len(sel):
        return fp, np.empty(0)
    sub = logits[sel] if len(sel) < len(logits) else logits
    sub -= sub.max(axis=1, keepdims=True)
    target_shifted = sub[np.arange(len(sel)), tgt]
    np.exp(sub, out=sub)
    return fp, (np.log(sub.sum(axis=1)) - target_shifted).astype(np.float64)


def torch_math(device):
    import torch

    def math_on_device(logits, sel, tgt, probe_vec):
        x = torch.from_numpy(logits).to(device)
        fp = (x @ torch.from_numpy(probe_vec).to(device)).double().cpu().numpy()
        if not len(sel):
            return fp, np.empty(0)
        sub = x[torch.from_numpy(sel).to(device)] if len(sel) < len(logits) else x
        t = torch.from_numpy(np.ascontiguousarray(tgt, dtype=np.int64)).to(device)
        nats = torch.logsumexp(sub, dim=1) - sub.gather(1, t[:, None])[:, 0]
        return fp, nats.double().cpu().numpy()
    return math_on_device


def mlx_math(logits, sel, tgt, probe_vec):
    import mlx.core as mx
    x = mx.array(logits)
    fp = x @ mx.array(probe_vec)
    if not len(sel):
        return np.array(fp, dtype=np.float64), np.empty(0)
    sub = x[mx.array(sel.astype(np.int32))] if len(sel) < len(logits) else x
    t = mx.array(np.asarray(tgt, dtype=np.int32))
    nats = mx.logsumexp(sub, axis=1) - mx.take_along_axis(sub, t[:, None], axis=1)[:, 0]
    mx.eval(fp, nats)
    return np.array(fp, dtype=np.float64), np.array(nats, dtype=np.float64)


def pick_math(choice: str | None = None):
    """(name, function): CUDA through torch, Metal through MLX, else numpy (fastest on a CPU).
    $AUTORESEARCH_SCORER_DEVICE = auto | numpy | torch | mlx picks one by hand."""
    import importlib.util
    import shutil
    choice = choice or os.environ.get("AUTORESEARCH_SCORER_DEVICE") or "auto"
    if choice == "numpy":
        return "numpy", numpy_math
    if choice == "torch" or (choice == "auto" and shutil.which("nvidia-smi") and importlib.util.find_spec("torch")):
        import torch
        if torch.cuda.is_available():
            return "torch cuda", torch_math("cuda")
        if choice == "torch":
            return "torch cpu", torch_math("cpu")
    if choice == "mlx" or (choice == "auto" and sys.platform == "darwin" and importlib.util.find_spec("mlx")):
        import mlx.core as mx
        if choice == "mlx" or mx.metal.is_available():
            return f"mlx {mx.default_device()}", mlx_math
    return "numpy", numpy_math


def plan_items(n_main: int, n_hidden: int, T: int, vocab: int, rng: np.random.Generator,
               probes: int | None = None) -> list[tuple]:
    """The evaluation's rows in order: ("main"|"hidden", i) or ("probe", k, kind, i, cut)."""
    items = [("main", i) for i in range(n_main)] + [("hidden", i) for i in range(n_hidden)]
    if probes is None:
        probes = max(MIN_PROBES, math.ceil(PROBE_FRACTION * n_main)) if T > 1 else 0
    probed = rng.choice(len(items), size=min(probes, len(items)), replace=False) if items else []
    for k, j in enumerate(probed):
        kind, i = items[j]
        items.append(("probe", k, kind, i, int(rng.integers(1, T))))
    return [items[j] for j in rng.permutation(len(items))]


class Evaluation:
    """Scores one evaluation: the rows, the probes, the running sums."""

    def __init__(self, rows: np.ndarray, hidden: np.ndarray, token_bytes: np.ndarray, vocab: int,
                 rng: np.random.Generator, probes: int | None = None, math=None):
        self.math = math or numpy_math
        self.rows, self.hidden, self.token_bytes, self.vocab = rows, hidden, token_bytes, vocab
        self.T = rows.shape[1] - 1
        self.rng = rng
        self.items = plan_items(len(rows), len(hidden), self.T, vocab, rng, probes)
        self.nats = {"main": 0.0, "hidden": 0.0}
        self.bytes = {"main": int(token_bytes[rows[:, 1:]].sum()),
                      "hidden": int(token_bytes[hidden[:, 1:]].sum()) if len(hidden) else 0}
        self.probe_vec = rng.standard_normal(vocab).astype(np.float32)
        watched = {(it[2], it[3]) for it in self.items if it[0] == "probe"}
        self.fingerprints: dict = {}        # ("main"|"hidden", i) or ("probe", k) -> (T,) float64
        self._watched = watched
        self.siblings: dict = {}            # k -> (inputs (T,), source key, cut)
        for it in self.items:
            if it[0] == "probe":
                _, k, kind, i, cut = it
                src = (self.rows if kind == "main" else self.hidden)[i, :-1]
                tail = (src[cut:] + rng.integers(1, vocab, self.T - cut)) % vocab
                self.siblings[k] = (np.concatenate([src[:cut], tail]).astype(np.int32), (kind, i), cut)
        self.problem: str | None = None

    def inputs(self, item) -> np.ndarray:
        if item[0] == "probe":
            return self.siblings[item[1]][0]
        return (self.rows if item[0] == "main" else self.hidden)[item[1], :-1]

    def batches(self, batch_size: int):
        """Per batch: (items, (B, T) int32 inputs, (B,) kind codes, (B, T) targets); the last
        batch padded with unscored rows. Kind codes: 0 main, 1 hidden, 2 probe, 3 padding."""
        code = {"main": 0, "hidden": 1, "probe": 2, "pad": 3}
        for s in range(0, len(self.items), batch_size):
            chunk = list(self.items[s:s + batch_size])
            chunk += [("pad", None)] * (batch_size - len(chunk))
            x = np.stack([self.inputs(it if it[0] != "pad" else self.items[0]) for it in chunk]).astype(np.int32)
            kinds = np.array([code[it[0]] for it in chunk])
            targets = np.zeros((batch_size, self.T), np.int64)
            for r, it in enumerate(chunk):
                if it[0] in ("main", "hidden"):
                    targets[r] = (self.rows if it[0] == "main" else self.hidden)[it[1], 1:]
            yield chunk, x, kinds, targets

    def score_chunk(self, batch, start: int, logits: np.ndarray) -> None:
        """Positions start .. start+len(logits) of a batch, flattened (row-major over (B, T)).
        `logits` must be the scorer's own copy; it is overwritten."""
        items, _, kinds, targets = batch
        T, n = self.T, len(logits)
        pos = np.arange(start, start + n)
        row_of, t_of = pos // T, pos % T
        kind_of = kinds[row_of]
        sel = np.nonzero(kind_of <= 1)[0]
        tgt = targets[row_of[sel], t_of[sel]]
        fp, nats = self.math(logits, sel, tgt, self.probe_vec)
        if not (np.isfinite(fp).all() and np.isfinite(nats).all()):
            self.problem = self.problem or "model(x) returned non-finite logits (NaN or inf)"
            return
        if len(sel):
            counted = self.token_bytes[tgt] > 0
            for code, kind in ((0, "main"), (1, "hidden")):
                self.nats[kind] += float(nats[counted & (kind_of[sel] == code)].sum(dtype=np.float64))
        for r in np.unique(row_of):
            item = items[r]
            key = ("probe", item[1]) if item[0] == "probe" else (item[0], item[1])
            if item[0] == "probe" or key in self._watched:
                m = row_of == r
                fps = self.fingerprints.setdefault(key, np.full(T, np.nan))
                fps[t_of[m]] = fp[m]

    def causality(self) -> str | None:
        for k, (_, source, cut) in self.siblings.items():
            a, b = self.fingerprints.get(source), self.fingerprints.get(("probe", k))
            if a is None or b is None:
                return "the model's logits for some rows never arrived"
            scale = float(np.abs(a[:cut]).max()) + 1.0
            moved = np.abs(a[:cut] - b[:cut])
            if moved.size and moved.max() > CAUSALITY_RTOL * scale:
                p = int(np.argmax(moved > CAUSALITY_RTOL * scale))
                return (f"the logits at position {p} changed when only tokens from position {cut} on changed: "
                        "the model reads future tokens (not causal)")
        return None

    def result(self) -> dict:
        out = {"eval_tokens": len(self.rows) * self.T, "probes": len(self.siblings),
               "rows_sent": len(self.items)}
        problem = self.problem or self.causality()
        if problem:
            out["invalid"] = problem
            return out
        out["val_bpb"] = self.nats["main"] / (math.log(2) * self.bytes["main"])
        if len(self.hidden) and self.bytes["hidden"]:
            out["hidden_bpb"] = self.nats["hidden"] / (math.log(2) * self.bytes["hidden"])
            out["hidden_tokens"] = len(self.hidden) * self.T
        return out


def serve(sock: socket.socket, load, probes: int | None = None,
          rng: np.random.Generator | None = None) -> dict:
    """Run one evaluation over `sock`. `load()` returns (rows, hidden, token_bytes, vocab, meta),
    called only when the trainer asks to be scored. Returns the result (also sent)."""
    t0 = time.monotonic()
    try:
        hello, _ = recv(sock, max_payload=0)
    except ProtocolError:
        return {"error": "the trainer never asked to be scored (evaluate_bpb was not called)"}
    batch_size = hello.get("batch_size")
    if hello.get("op") != "hello" or not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
        return {"invalid": f"a bad hello from the trainer: {hello!r}"}
    rows, hidden, token_bytes, vocab, meta = load()
    rng = rng or np.random.default_rng(secrets.randbits(128))
    device, math_fn = pick_math()
    meta = {**meta, "scorer_device": device}
    ev = Evaluation(rows, hidden, token_bytes, vocab, rng, probes, math=math_fn)
    T = ev.T
    slot_positions = max(1, CHUNK_BYTES // (4 * vocab))
    slot_bytes = slot_positions * vocab * 4
    fd = _shared_buffer(SLOTS * slot_bytes)
    shm = mmap.mmap(fd, SLOTS * slot_bytes)
    try:
        socket.send_fds(sock, [b"W"], [fd])      # one byte carries the shared buffer's descriptor
        send(sock, {"op": "welcome", "eval_tokens": len(rows) * T, "vocab": vocab,
                    "slot_positions": slot_positions, "slots": SLOTS})
        batches, in_flight = ev.batches(batch_size), collections.deque()

        def send_next():
            batch = next(batches, None)
            if batch is not None:
                send(sock, {"op": "batch", "n": batch_size, "T": T}, batch[1].tobytes())
                in_flight.append(batch)

        for _ in range(AHEAD):
            send_next()
        while in_flight:
            batch, got = in_flight.popleft(), 0
            while True:
                msg, _ = recv(sock, max_payload=0)
                op = msg.get("op")
                if op == "batch_done":
                    if msg.get("shape") != [batch_size, T, vocab]:
                        ev.problem = ev.problem or (f"model(x) returned logits of shape {tuple(msg.get('shape') or ())}; "
                                                    f"the harness needs (B, T, vocab) = {(batch_size, T, vocab)}")
                    break
                if op != "chunk":
                    raise ProtocolError(f"unexpected message {op!r}")
                slot, n = msg.get("slot"), msg.get("n")
                if msg.get("V") != vocab:
                    ev.problem = ev.problem or (f"model(x) returned logits of shape (..., {msg.get('V')}); the "
                                                f"harness needs (B, T, vocab) = {(batch_size, T, vocab)}")
                    raise ProtocolError(ev.problem)
                if slot not in range(SLOTS) or not isinstance(n, int) or not 0 < n <= slot_positions \
                        or got + n > batch_size * T:
                    raise ProtocolError(f"a bad chunk {msg!r}")
                # a private copy first: the trainer can write the slot while we read it, and the
                # causality fingerprint and the loss must see the same numbers
                chunk = np.frombuffer(shm, np.float32, n * vocab, slot * slot_bytes).reshape(n, vocab).copy()
                ev.score_chunk(batch, got, chunk)
                got += n
                send(sock, {"op": "free", "slot": slot})
            if got != batch_size * T and not ev.problem:
                ev.problem = f"the trainer returned logits for {got} of {batch_size * T} positions"
            send_next()
        result = {**meta, **ev.result(), "seconds": round(time.monotonic() - t0, 3)}
    except (ProtocolError, OSError) as e:
        result = {**meta, "invalid": f"the evaluation broke off: {e}",
                  "seconds": round(time.monotonic() - t0, 3)}
    finally:
        shm.close()
        os.close(fd)
    try:
        if "invalid" in result:
            send(sock, {"op": "refused", "reason": result["invalid"]})
        else:
            send(sock, {"op": "done", "val_bpb": result["val_bpb"], "eval_tokens": result["eval_tokens"],
                        "unigram_bpb": result.get("unigram_bpb")})
    except OSError:
        pass
    return result


# -- the model side (runs in the trainer, inside the sandbox) ----------------------------------
def evaluate_remote(fd: int, batch_logits, batch_size: int) -> dict:
    """Hand the scorer logits for every batch it sends. `batch_logits(x)` takes (B, T) int32
    inputs and yields (logits shape, float32 numpy chunks (n, V) in row-major order).
    Returns the scorer's final message: {"op": "done", "val_bpb", "eval_tokens", "unigram_bpb"} or
    {"op": "refused", "reason"}."""
    sock = socket.socket(fileno=fd)
    try:
        send(sock, {"op": "hello", "batch_size": int(batch_size)})
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        if not fds:
            raise ProtocolError("the scorer sent no shared buffer")
        info, _ = recv(sock)
        if info.get("op") != "welcome":
            raise ProtocolError(f"the scorer refused: {info.get('reason', info)}")
        slots, slot_positions, vocab = info["slots"], info["slot_positions"], info["vocab"]
        slot_bytes = slot_positions * vocab * 4
        shm = mmap.mmap(fds[0], slots * slot_bytes)
        os.close(fds[0])
        free, pending, final = list(range(slots)), [], None

        def pump():
            nonlocal final
            msg, payload = recv(sock)
            op = msg.get("op")
            if op == "free":
                free.append(msg["slot"])
            elif op == "batch":
                pending.append(np.frombuffer(payload, np.int32).reshape(msg["n"], msg["T"]))
            elif op in ("done", "refused"):
                final = msg
            else:
                raise ProtocolError(f"unexpected message {op!r}")

        while final is None:
            while not pending and final is None:
                pump()
            if final is not None:
                break
            x = pending.pop(0)
            shape = None
            for shape, chunk in batch_logits(x):
                for s in range(0, len(chunk), slot_positions):
                    part = chunk[s:s + slot_positions]
                    while not free:
                        pump()
                    slot = free.pop(0)
                    V = part.shape[1]
                    if V != vocab:       # the scorer refuses the model; wait for its word
                        send(sock, {"op": "chunk", "slot": slot, "n": len(part), "V": V})
                        while final is None:
                            pump()
                        return final
                    np.frombuffer(shm, np.float32, part.size, slot * slot_bytes)[:] = part.reshape(-1)
                    send(sock, {"op": "chunk", "slot": slot, "n": len(part), "V": V})
            send(sock, {"op": "batch_done", "shape": list(shape) if shape is not None else None})
        shm.close()
        return final
    finally:
        sock.close()


# -- the scorer process -----------------------------------------------------------------------
def main(argv=None) -> int:
    """`python -m harness.scorer --fd N`: started by the runner in the repository root, with
    the run's profile and dataset in the environment. Prints one JSON line: the result."""
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    import prepare

    def load():
        tok = prepare.Tokenizer.from_directory()
        rows = prepare.eval_rows(tok)
        hidden = prepare.hidden_rows(tok)
        meta = {"profile": prepare.PROFILE.name, "dataset": prepare.DATASET,
                "unigram_bpb": prepare.unigram_bpb(tok)}
        return rows, hidden, prepare.get_token_bytes(), tok.get_vocab_size(), meta

    sock = socket.socket(fileno=args.fd)
    try:
        result = serve(sock, load)
    except prepare.HarnessError as e:
        result = {"error": str(e)}
    finally:
        sock.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
