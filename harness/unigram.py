"""The unigram floor: the bits per byte of a model that ignores context and predicts every
token with its frequency in the training data. A trained model that does not beat it has
learned nothing but token counts.

The counts come from the first UNIGRAM_TOKENS tokens of the training stream (all of a small
dataset), add-one smoothed so no token has probability zero, and are cached in the
tokenizer folder, tied to the tokenizer by the sha256 of its fingerprint file.
"""
import hashlib
import math
import os

import numpy as np

UNIGRAM_TOKENS = 1 << 23
COUNTS_FILE = "unigram_counts.npz"


def _fingerprint_id(tokenizer_dir):
    with open(os.path.join(tokenizer_dir, "fingerprint.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def count_tokens(token_batches, vocab, limit=UNIGRAM_TOKENS):
    """Token counts (vocab,) int64 over the documents of `token_batches` (lists of token
    arrays, as prepare's tokenized stream yields), stopping after `limit` tokens."""
    counts = np.zeros(vocab, dtype=np.int64)
    seen = 0
    for docs, _ in token_batches:
        flat = np.concatenate(docs)
        counts += np.bincount(flat, minlength=vocab)[:vocab]
        seen += len(flat)
        if seen >= limit:
            break
    return counts


def cached_counts(tokenizer_dir, vocab, token_batches):
    """The training-token counts, from the cache when it belongs to this tokenizer, else
    counted now (`token_batches()` makes the stream) and saved."""
    path = os.path.join(tokenizer_dir, COUNTS_FILE)
    fingerprint = _fingerprint_id(tokenizer_dir)
    try:
        with np.load(path) as saved:
            if str(saved["fingerprint"]) == fingerprint and saved["counts"].shape == (vocab,):
                return saved["counts"]
    except (OSError, KeyError, ValueError):
        pass
    counts = count_tokens(token_batches(), vocab)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, counts=counts, fingerprint=np.array(fingerprint))
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only cache: counted again next time, still correct
    return counts


def unigram_bpb(counts, rows, token_bytes):
    """Bits per byte of the smoothed unigram model on the targets of `rows` (N, T+1),
    special tokens (byte length 0) excluded, as evaluate_bpb scores a model."""
    logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    targets = rows[:, 1:]
    nbytes = token_bytes[targets]
    scored = nbytes > 0
    return float(-logp[targets[scored]].sum() / (math.log(2) * nbytes[scored].sum()))


def floors_line(scorers):
    """One line of the floors, {profile name: () -> bpb}; a profile whose rows do not fit the
    validation shard (HarnessError) is left out."""
    from harness.errors import HarnessError
    floors = []
    for name, score in scorers.items():
        try:
            floors.append(f"{name} profile {score():.4f}")
        except HarnessError:
            pass
    return f"Unigram floor (bpb of token frequencies on the eval rows): {', '.join(floors) or 'no profile fits'}"
