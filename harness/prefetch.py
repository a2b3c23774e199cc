"""The loader's plumbing behind prepare.make_dataloader: packing runs ahead of the training
step in a background thread, and torch batches reach a CUDA device through pinned,
double-buffered host memory with non-blocking copies."""
import atexit
import threading

import numpy as np

_workers = []   # (stop event, thread) of every prefetching thread


@atexit.register
def _stop_workers():
    # A daemon thread still inside native code (tokenizer, torch) while the interpreter
    # shuts down can abort the process after the summary was printed ("terminate called
    # without an active exception"): stop and join them first.
    for stop, thread in _workers:
        stop.set()
    for stop, thread in _workers:
        thread.join(timeout=5)


def prefetched(iterator, depth=4):
    """Run `iterator` in a background thread, up to `depth` items ahead, in order: reading,
    tokenizing and packing the next batches overlaps the training step (MLX, torch and
    tiktoken release the GIL while they work). Errors are re-raised in the consumer."""
    import queue
    items = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def worker():
        try:
            for value in iterator:
                if not put(("value", value)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, with its traceback
            put(("error", e))

    thread = threading.Thread(target=worker, daemon=True, name="autoresearch-dataloader")
    _workers.append((stop, thread))
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "value":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()  # the consumer is gone: let the worker exit


def torch_batches(rows_iter, B, T, device):
    """(inputs, targets, epoch) torch int64 tensors on device from packed rows (B, T+1)."""
    import torch
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        for rows, epoch in rows_iter:
            yield torch.from_numpy(np.ascontiguousarray(rows[:, :-1])).to(device), \
                torch.from_numpy(np.ascontiguousarray(rows[:, 1:])).to(device), epoch
        return
    # CUDA: two pinned host buffers, so filling the next batch never races the copy in flight.
    pinned = [torch.empty(2 * B * T, dtype=torch.long, pin_memory=True) for _ in range(2)]
    events = [None, None]
    for step, (rows, epoch) in enumerate(rows_iter):
        slot = step % 2
        if events[slot] is not None:
            events[slot].synchronize()
        host = pinned[slot].numpy()
        host[:B * T].reshape(B, T)[:] = rows[:, :-1]
        host[B * T:].reshape(B, T)[:] = rows[:, 1:]
        gpu = pinned[slot].to(device, non_blocking=True)
        events[slot] = torch.cuda.Event()
        events[slot].record()
        yield gpu[:B * T].view(B, T), gpu[B * T:].view(B, T), epoch
