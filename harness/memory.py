"""How much memory a training step may use, and the micro-batch that fits in it.
prepare.py re-exports `memory_limit` and `fit_device_batch` for the trainers."""
import os
import sys

MEMORY_ENV = "AUTORESEARCH_MEMORY_GB"
HEADROOM = 0.9  # a step may plan on 90% of the limit: allocator slack, the data pipeline, the OS
GiB = 2 ** 30


def available_ram():
    """Bytes of RAM free for a new allocation now: MemAvailable on Linux, physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(device_bytes=None, device_source="device", in_use=0):
    """(bytes, where the figure comes from) that a training step may use, the process's own
    allocations included: AUTORESEARCH_MEMORY_GB when set, else the device's own figure (Metal's
    recommended working set; CUDA's free plus reserved memory), else the RAM available now plus
    `in_use`, what the process already holds (a CPU)."""
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if raw:
        try:
            gb = float(raw)
        except ValueError:
            gb = 0.0
        if not gb > 0:
            sys.exit(f"{MEMORY_ENV}={raw!r} is not a positive number of GiB: set it like {MEMORY_ENV}=6, or unset it")
        return int(gb * GiB), MEMORY_ENV
    if device_bytes:
        return int(device_bytes), device_source
    return available_ram() + in_use, "available RAM"


def fit_device_batch(peak_at, device_batch, rows_per_step, seq_len, limit):
    """The micro-batch to train with, and the line that says so.

    peak_at(rows) runs one throwaway training step of `rows` sequences and returns its peak bytes;
    limit is memory_limit()'s (bytes, source). The step is measured at a quarter and a half of
    device_batch (or smaller, where those might not fit) and extrapolated linearly (activations
    grow with the rows), so no step runs before it is known to fit. device_batch is kept when its
    step fits, else halved until it does (the caller raises gradient accumulation, keeping the
    rows per optimizer step); if one row does not fit, the run stops here, before training.
    """
    limit_bytes, source = limit
    budget = HEADROOM * limit_bytes
    sizes = [device_batch]  # device_batch, then about half of it at each step, each dividing rows_per_step
    while sizes[-1] > 1:
        sizes.append(max(d for d in range(1, sizes[-1] // 2 + 1) if rows_per_step % d == 0))
    i = min(2, len(sizes) - 1)
    p_lo = peak_at(sizes[i])
    while p_lo > budget and i + 1 < len(sizes):
        i += 1
        p_lo = peak_at(sizes[i])
    lo = sizes[i]
    if p_lo > budget:
        sys.exit(f"FAIL: one sequence of {seq_len} tokens needs a {p_lo / GiB:.2f} GiB training step, more than "
                 f"{HEADROOM:.0%} of the {limit_bytes / GiB:.2f} GiB this machine allows ({source}): make the model "
                 f"smaller (DEPTH, ASPECT_RATIO) or run on a machine with more memory.")
    # a second point for the slope: the next larger size when it is safe to run (k times the rows
    # need at most k times the memory), else the next smaller one
    if i > 0 and p_lo * sizes[i - 1] / lo <= budget:
        other = sizes[i - 1]
    elif i + 1 < len(sizes):
        other = sizes[i + 1]
    else:
        other = None
    slope = p_lo / lo if other is None else max(0.0, (peak_at(other) - p_lo) / (other - lo))
    predict = lambda rows: p_lo + (rows - lo) * slope
    batch = next(b for b in sizes if b <= lo or predict(b) <= budget)
    where = f"{limit_bytes / GiB:.1f} GiB allowed ({source})"
    if batch == device_batch:
        return batch, f"Memory: training step ~{predict(batch) / GiB:.2f} GiB (estimated) of {where}"
    return batch, (f"Memory: DEVICE_BATCH_SIZE {device_batch} -> {batch}: a step of {device_batch} rows would need "
                   f"~{predict(device_batch) / GiB:.2f} GiB of {where}; {rows_per_step // batch} micro-steps keep "
                   f"TOTAL_BATCH_SIZE")
