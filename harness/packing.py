"""The loader's packing: texts to BOS-prefixed token arrays, and upstream's BOS-aligned best-fit
packing of those into rows, with a length-indexed buffer that makes the same choices in
O(log n) per document (bench/dataloader.py times it against upstream's scan)."""
import bisect
import collections
import itertools

import numpy as np


def tokenized_batches(tokenizer, doc_batches):
    """(list of BOS-prefixed uint16/int32 token arrays, epoch) for each batch of texts."""
    bos = tokenizer.get_bos_token_id()
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.int32
    for texts, epoch in doc_batches:
        token_lists = tokenizer.enc.encode_ordinary_batch(texts, num_threads=8)
        lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
        flat = np.empty(int(lengths.sum()), dtype=dtype)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        flat[starts] = bos
        body = np.ones(len(flat), dtype=bool)
        body[starts] = False
        flat[body] = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=dtype, count=len(flat) - len(starts))
        yield [flat[s:e] for s, e in zip(starts.tolist(), ends.tolist())], epoch


class BestFitBuffer:
    """The document buffer of upstream's best-fit packer, indexed by length.

    Upstream scans the whole buffer (insertion order) for the first document with the
    largest length <= remaining, else pops the first shortest one. Keeping one FIFO per
    length plus the sorted distinct lengths gives the same choice in O(log n)."""

    def __init__(self):
        self.by_length = {}   # length -> deque of documents in arrival order
        self.lengths = []     # sorted distinct lengths present
        self.count = 0

    def add(self, doc):
        n = len(doc)
        queue = self.by_length.get(n)
        if queue is None:
            queue = self.by_length[n] = collections.deque()
            bisect.insort(self.lengths, n)
        queue.append(doc)
        self.count += 1

    def _pop_length(self, index):
        n = self.lengths[index]
        queue = self.by_length[n]
        doc = queue.popleft()
        if not queue:
            del self.by_length[n]
            del self.lengths[index]
        self.count -= 1
        return doc

    def pop_best_fit(self, remaining):
        """The first-arrived document of the largest length <= remaining, or None."""
        i = bisect.bisect_right(self.lengths, remaining) - 1
        return self._pop_length(i) if i >= 0 else None

    def pop_shortest(self):
        return self._pop_length(0)


def pack_rows(token_batches, B, T, buffer_size=1000, dtype=np.int64):
    """Upstream's BOS-aligned best-fit packing: yields (rows (B, T+1), epoch).

    token_batches yields (list of token arrays, epoch). Each row is filled with the
    largest buffered document that fits; when none fits, the shortest one is cropped
    to fill the row exactly. A finite stream (evaluation) is packed until the buffer runs
    dry; the row that cannot be completed is dropped and a partial last batch is yielded
    with fewer rows."""
    row_capacity = T + 1
    buffer = BestFitBuffer()
    epoch = 1
    exhausted = False
    while True:
        rows = np.empty((B, row_capacity), dtype=dtype)
        for r in range(B):
            pos = 0
            while pos < row_capacity:
                while buffer.count < buffer_size and not exhausted:
                    try:
                        docs, epoch = next(token_batches)
                    except StopIteration:
                        exhausted = True
                        break
                    for doc in docs:
                        buffer.add(doc)
                if buffer.count == 0:  # a finite stream ran out mid-row
                    if r:
                        yield rows[:r], epoch
                    return
                remaining = row_capacity - pos
                doc = buffer.pop_best_fit(remaining)
                if doc is not None:
                    rows[r, pos:pos + len(doc)] = doc
                    pos += len(doc)
                else:
                    rows[r, pos:] = buffer.pop_shortest()[:remaining]
                    pos = row_capacity
        yield rows, epoch
