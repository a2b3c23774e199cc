"""Device peak FLOPs (for MFU): dense, per device, by dtype, and whether a GPU is there
(which picks the default profile). prepare.py re-exports both."""
import os
import platform
import re
import sys


def gpu_expected():
    """Whether the trainers will find a GPU, told without importing MLX or torch: Apple
    Silicon (Metal), or an NVIDIA driver that CUDA_VISIBLE_DEVICES does not hide.
    AUTORESEARCH_DEVICE=cpu (train.py's device switch) says no."""
    if os.environ.get("AUTORESEARCH_DEVICE") == "cpu":
        return False
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")

def profile_line(name, on_gpu, from_env):
    """The trainer's start-up line: the profile, and why it is the one in use."""
    if from_env:
        return f"Profile: {name} (AUTORESEARCH_PROFILE)"
    if (name == "standard") == on_gpu:
        return (f"Profile: {name} (the default on a {'GPU' if on_gpu else 'CPU'}; "
                f"AUTORESEARCH_PROFILE={'cpu' if on_gpu else 'standard'} selects the other)")
    return (f"Profile: {name} (the default here), but this trainer runs on the "
            f"{'GPU' if on_gpu else 'CPU'}: AUTORESEARCH_PROFILE={'standard' if on_gpu else 'cpu'} fits it")


# NVIDIA: dense tensor-core throughput with fp32 accumulation (bf16/fp16), and tf32/fp32.
_NVIDIA_PEAKS = [  # (name pattern, {dtype: FLOP/s}); the first matching pattern wins
    (r"H200", {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.7e12, "fp32": 67e12}),
    (r"H100.*PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"H100", {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.7e12, "fp32": 67e12}),
    (r"GH200", {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.7e12, "fp32": 67e12}),
    (r"B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 80e12}),
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"A10G", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    (r"RTX 5090", {"bf16": 209.5e12, "fp16": 209.5e12, "tf32": 104.8e12, "fp32": 104.8e12}),
    (r"RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"RTX 4080", {"bf16": 97.5e12, "fp16": 97.5e12, "tf32": 48.7e12, "fp32": 48.7e12}),
    (r"RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    (r"RTX 3080", {"bf16": 59.5e12, "fp16": 59.5e12, "tf32": 29.8e12, "fp32": 29.8e12}),
]

# Apple GPUs, full-core configurations: (fp32 FMA FLOP/s, GPU cores). MLX runs bf16/fp16
# matmuls at about the same rate on M1-M4, so one number serves every dtype; a binned part
# (a 30-core M3 Max) scales by its core count.
_APPLE = {
    "M1": (2.6e12, 8), "M1 Pro": (5.2e12, 16), "M1 Max": (10.4e12, 32), "M1 Ultra": (21.2e12, 64),
    "M2": (3.6e12, 10), "M2 Pro": (6.8e12, 19), "M2 Max": (13.6e12, 38), "M2 Ultra": (27.2e12, 76),
    "M3": (4.1e12, 10), "M3 Pro": (7.4e12, 18), "M3 Max": (16.4e12, 40), "M3 Ultra": (32.8e12, 80),
    "M4": (4.3e12, 10), "M4 Pro": (9.2e12, 20), "M4 Max": (18.4e12, 40),
    "M5": (5.7e12, 10),
}


def _apple_chip(name):
    m = re.search(r"\bM([1-9])(?:\s+(Pro|Max|Ultra))?\b", name or "")
    if "Apple" not in (name or "") or not m:
        return None
    key = f"M{m.group(1)}" + (f" {m.group(2)}" if m.group(2) else "")
    return key if key in _APPLE else None


def peak_flops(device_name, dtype="bf16", gpu_cores=None):
    """Peak dense FLOP/s of a device by name ("NVIDIA H100 80GB HBM3", "Apple M3 Max"), or None.
    gpu_cores: an Apple GPU's core count, which scales the full part's table value."""
    dtype = str(dtype).rsplit(".", 1)[-1]  # also torch.bfloat16 / mlx.core.bfloat16
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16", "float": "fp32"}.get(dtype, dtype)
    chip = _apple_chip(device_name)
    if chip:
        peak, cores = _APPLE[chip]
        return peak * (gpu_cores / cores if gpu_cores else 1)
    for pattern, peaks in _NVIDIA_PEAKS:
        if re.search(pattern, device_name or "", flags=re.I):
            return peaks.get(dtype)
    return None


def peak_source(device_name, dtype="bf16", gpu_cores=None):
    """Where peak_flops' number comes from, for the trainer's log."""
    peak = peak_flops(device_name, dtype, gpu_cores)
    chip = _apple_chip(device_name)
    if chip and gpu_cores:
        full, cores = _APPLE[chip]
        return (f"{device_name}: {peak / 1e12:.1f} TFLOP/s for {gpu_cores} GPU cores (the {cores}-core "
                f"{chip}'s {full / 1e12:.1f} TFLOP/s, scaled)")
    if chip:
        return (f"{device_name}: table value {peak / 1e12:.1f} TFLOP/s of the full {_APPLE[chip][1]}-core {chip} "
                "(no GPU core count was reported: a chip with fewer cores reads low)")
    return f"{device_name} {dtype} table value {peak / 1e12:.1f} TFLOP/s"


def apple_gpu_cores(info=None):
    """An Apple GPU's core count: from MLX's device info when it has one, else IOKit's
    `gpu-core-count` (ioreg), else None."""
    for key in ("gpu_core_count", "gpu_cores", "num_gpu_cores"):
        if isinstance((info or {}).get(key), int):
            return info[key]
    if sys.platform != "darwin":
        return None
    import subprocess
    try:
        out = subprocess.run(["ioreg", "-rd1", "-c", "AGXAccelerator"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'"gpu-core-count"\s*=\s*(\d+)', out)
    return int(m.group(1)) if m else None
