"""Tokenizer training (rustbpe -> tiktoken, as upstream) and its fingerprint: the record
that ties a saved tokenizer to the validation shard of the data it was trained for.

prepare.py passes the tokenizer spec (vocab size, split pattern, special tokens) and a
dataset's paths (prepare.DatasetPaths: name, root, data, tokenizer, val).
"""
import json
import os
import pickle
import time

import numpy as np

from harness.errors import HarnessError
from harness.files import Progress, human_bytes, sha256_file


def text_iterator(parquet_files, max_chars=1_000_000_000, doc_cap=10_000):
    """Yield documents from opened parquet files (the training split), each cut to doc_cap
    characters, until max_chars characters."""
    nchars = 0
    for pf in parquet_files:
        for rg_idx in range(pf.num_row_groups):
            for text in pf.read_row_group(rg_idx).column("text").to_pylist():
                doc = text[:doc_cap] if len(text) > doc_cap else text
                nchars += len(doc)
                yield doc
                if nchars >= max_chars:
                    return


def train_bpe(texts, vocab_size, split_pattern, special_tokens):
    """Train a byte-level BPE with rustbpe on an iterator of strings; return the tiktoken Encoding
    (vocab_size ids, the special tokens last)."""
    import rustbpe
    import tiktoken
    t0 = time.time()
    counted = {"docs": 0, "chars": 0}
    progress = Progress("tokenizer")

    def counting(it):
        for text in it:
            counted["docs"] += 1
            counted["chars"] += len(text)
            progress.update(f"read {counted['docs']} documents, {human_bytes(counted['chars'])}")
            yield text

    print("Tokenizer: training BPE tokenizer...", flush=True)
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(counting(texts), vocab_size - len(special_tokens), pattern=split_pattern)
    mergeable_ranks = {bytes(k): v for k, v in tokenizer.get_mergeable_ranks()}
    tokens_offset = len(mergeable_ranks)
    special = {name: tokens_offset + i for i, name in enumerate(special_tokens)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.get_pattern(),
                            mergeable_ranks=mergeable_ranks, special_tokens=special)
    print(f"Tokenizer: trained on {counted['docs']} documents ({human_bytes(counted['chars'])}) "
          f"in {time.time() - t0:.1f}s")
    return enc


def token_byte_lengths(enc):
    """Bytes per token id (0 for special tokens), as upstream's token_bytes."""
    special = enc.special_tokens_set
    lengths = []
    for token_id in range(enc.n_vocab):
        token_str = enc.decode([token_id])
        lengths.append(0 if token_str in special else len(token_str.encode("utf-8")))
    return np.array(lengths, dtype=np.int32)


def _val_fingerprint(paths):
    st = os.stat(paths.val)
    return {"dataset": paths.name, "val_shard": os.path.basename(paths.val), "val_size": st.st_size,
            "val_mtime_ns": st.st_mtime_ns, "val_sha256": sha256_file(paths.val)}


def save_tokenizer(enc, paths):
    """Save the tiktoken pickle, token_bytes.npy and the fingerprint of the data it belongs to."""
    out = paths.tokenizer
    os.makedirs(out, exist_ok=True)
    test = "Hello world! Numbers: 123. Unicode: 你好"
    decoded = enc.decode(enc.encode_ordinary(test))
    if decoded != test:
        raise HarnessError(f"tokenizer round trip failed: {test!r} -> {decoded!r}; rerun prepare.py")
    with open(os.path.join(out, "tokenizer.pkl"), "wb") as f:
        pickle.dump(enc, f)
    np.save(os.path.join(out, "token_bytes.npy"), token_byte_lengths(enc))
    with open(os.path.join(out, "fingerprint.json"), "w") as f:
        json.dump(_val_fingerprint(paths), f, indent=1)
    print(f"Tokenizer: saved to {out} (vocab_size={enc.n_vocab}, round trip ok)")


def tokenizer_matches(paths):
    try:
        return check_fingerprint(paths) is None
    except OSError:
        return False


def check_fingerprint(paths):
    """None if the tokenizer was trained for this dataset's current data, else the reason
    (OSError if the fingerprint or the validation shard is missing)."""
    with open(os.path.join(paths.tokenizer, "fingerprint.json")) as f:
        try:
            saved = json.load(f)
        except ValueError:
            return "its fingerprint.json is unreadable"
    st = os.stat(paths.val)
    if saved.get("dataset") != paths.name:
        return f"it was trained for dataset {saved.get('dataset')!r}"
    if saved.get("val_size") == st.st_size and saved.get("val_mtime_ns") == st.st_mtime_ns:
        return None  # unchanged file: skip hashing a large shard on every start
    if saved.get("val_size") != st.st_size or saved.get("val_sha256") != sha256_file(paths.val):
        return f"the validation shard {paths.val} changed since the tokenizer was trained"
    return None
