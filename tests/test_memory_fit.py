"""Fitting the micro-batch to the memory a machine allows (harness/memory.py), and both
trainers doing it for real under a cap set through AUTORESEARCH_MEMORY_GB."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import memory

REPO = Path(__file__).resolve().parent.parent
GiB = 2 ** 30


class Machine:
    """A step whose peak is fixed + rows * per_row bytes; records every step it was asked to run."""

    def __init__(self, fixed_gb, per_row_gb):
        self.fixed, self.per_row, self.ran = fixed_gb * GiB, per_row_gb * GiB, []

    def peak(self, rows):
        return self.fixed + rows * self.per_row

    def peak_at(self, rows):
        self.ran.append(rows)
        return self.peak(rows)


def fit(machine, limit_gb, device_batch=16, rows_per_step=32, seq_len=2048):
    return memory.fit_device_batch(machine.peak_at, device_batch, rows_per_step, seq_len,
                                   (int(limit_gb * GiB), "test cap"))


def test_a_step_that_fits_keeps_the_micro_batch():
    m = Machine(fixed_gb=0.5, per_row_gb=0.2)
    batch, line = fit(m, limit_gb=8)
    assert batch == 16
    assert m.ran == [4, 8]  # measured on a quarter and a half: the full step never ran untested
    assert "~3.70 GiB (estimated) of 8.0 GiB allowed (test cap)" in line


def test_a_step_too_big_halves_the_micro_batch_and_says_so():
    m = Machine(fixed_gb=0.5, per_row_gb=0.2)
    batch, line = fit(m, limit_gb=2.5)  # 16 rows need 3.7 GiB, 8 rows 2.1 (<= 90% of 2.5)
    assert batch == 8
    assert line.startswith("Memory: DEVICE_BATCH_SIZE 16 -> 8: a step of 16 rows would need ~3.70 GiB")
    assert "4 micro-steps keep TOTAL_BATCH_SIZE" in line
    assert m.ran == [4, 2] and all(m.peak(r) <= 0.9 * 2.5 * GiB for r in m.ran)  # no step it ran exceeded the budget


def test_when_even_the_quarter_does_not_fit_it_measures_smaller_steps_only():
    m = Machine(fixed_gb=0.2, per_row_gb=0.5)
    batch, _ = fit(m, limit_gb=1.5)  # 4 rows: 2.2 GiB; 2 rows: 1.2 (fits 1.35)
    assert batch == 2
    assert m.ran == [4, 2, 1]  # never 8 or 16; 4 was the first and only step over the budget


def test_the_micro_batch_stays_a_divisor_of_the_rows_per_step():
    m = Machine(fixed_gb=0.1, per_row_gb=0.1)
    batch, _ = fit(m, limit_gb=1.0, device_batch=12, rows_per_step=36)
    assert 36 % batch == 0 and batch * 0.1 + 0.1 <= 0.9
    assert batch == 6


def test_one_row_that_does_not_fit_stops_before_training():
    m = Machine(fixed_gb=3.0, per_row_gb=0.5)
    with pytest.raises(SystemExit, match=r"FAIL: one sequence of 2048 tokens needs a 3.50 GiB training step, "
                                         r"more than 90% of the 2.00 GiB this machine allows \(test cap\)"):
        fit(m, limit_gb=2)


def test_the_cap_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_MEMORY_GB", "6")
    assert memory.memory_limit(64 * GiB, "Metal") == (6 * GiB, "AUTORESEARCH_MEMORY_GB")
    monkeypatch.setenv("AUTORESEARCH_MEMORY_GB", "six")
    with pytest.raises(SystemExit, match="AUTORESEARCH_MEMORY_GB='six' is not a positive number of GiB"):
        memory.memory_limit()
    monkeypatch.delenv("AUTORESEARCH_MEMORY_GB")
    assert memory.memory_limit(64 * GiB, "Metal") == (64 * GiB, "Metal")
    ram, source = memory.memory_limit(in_use=GiB)
    assert source == "available RAM" and GiB < ram


def run_trainer(script, builtin_cache, cap_gb):
    env = {**os.environ, **builtin_cache, "AUTORESEARCH_MEMORY_GB": str(cap_gb)}
    return subprocess.run([sys.executable, script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script", ["train_mlx.py", "train.py"])
def test_a_machine_too_small_for_one_row_stops_before_training(builtin_cache, script):
    result = run_trainer(script, builtin_cache, cap_gb=0.001)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "FAIL: one sequence of 256 tokens needs a" in out
    assert "of the 0.00 GiB this machine allows (AUTORESEARCH_MEMORY_GB)" in out
    assert "step 00000" not in out and "val_bpb:" not in out


def estimated_gib(stdout):
    line = next(l for l in stdout.splitlines() if l.startswith("Memory:"))
    return float(re.search(r"~([0-9.]+) GiB", line).group(1)), line


@pytest.mark.slow
def test_train_mlx_lowers_the_micro_batch_to_fit_a_cap(builtin_cache):
    """The smoke run's step (8 rows of 256 tokens) under a cap a quarter below its own estimate: the
    trainer runs 4-row micro-steps, twice per optimizer step, and still trains the same tokens.
    The estimate is extrapolated from two measured peaks and varied by up to 7% between runs
    (0.42-0.47 GiB on the 2-core box) while a 4-row step measured ~0.24 GiB, so the cap sits
    between them with room for that noise on both sides."""
    free = run_trainer("train_mlx.py", builtin_cache, cap_gb=64)
    assert free.returncode == 0, free.stdout[-2000:] + free.stderr[-2000:]
    full, line = estimated_gib(free.stdout)
    assert "(estimated) of 64.0 GiB allowed (AUTORESEARCH_MEMORY_GB)" in line
    assert "gradient accumulation steps: 1" in free.stdout

    cap_gb = round(0.75 * full / memory.HEADROOM, 3)
    capped = run_trainer("train_mlx.py", builtin_cache, cap_gb=cap_gb)
    assert capped.returncode == 0, capped.stdout[-2000:] + capped.stderr[-2000:]
    _, line = estimated_gib(capped.stdout)
    assert line.startswith("Memory: DEVICE_BATCH_SIZE 8 -> 4: a step of 8 rows would need"), line
    assert "gradient accumulation steps: 2" in capped.stdout
    steps = int(re.search(r"^num_steps:\s+(\d+)", capped.stdout, re.M).group(1))
    tokens = float(re.search(r"^total_tokens_M:\s+([0-9.]+)", capped.stdout, re.M).group(1))
    assert tokens == pytest.approx(steps * 8 * 256 / 1e6, abs=0.051)
    peak_mb = float(re.search(r"^peak_vram_mb:\s+([0-9.]+)", capped.stdout, re.M).group(1))
    assert peak_mb * 2 ** 20 <= memory.HEADROOM * cap_gb * GiB  # the true peak stayed within the planned budget
