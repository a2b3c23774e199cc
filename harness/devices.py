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

# Apple GPUs (full-core configurations): fp32 FMA throughput; MLX runs bf16/fp16 matmuls at
# about the same rate on M1-M4, so one number serves every dtype.
_APPLE_PEAKS = {
    "M1": 2.6e12, "M1 Pro": 5.2e12, "M1 Max": 10.4e12, "M1 Ultra": 21.2e12,
    "M2": 3.6e12, "M2 Pro": 6.8e12, "M2 Max": 13.6e12, "M2 Ultra": 27.2e12,
    "M3": 4.1e12, "M3 Pro": 7.4e12, "M3 Max": 16.4e12, "M3 Ultra": 32.8e12,
    "M4": 4.3e12, "M4 Pro": 9.2e12, "M4 Max": 18.4e12,
    "M5": 5.7e12,
}


def peak_flops(device_name, dtype="bf16"):
    """Peak dense FLOP/s of a device by name ("NVIDIA H100 80GB HBM3", "Apple M3 Max"), or None."""
    dtype = str(dtype).rsplit(".", 1)[-1]  # also torch.bfloat16 / mlx.core.bfloat16
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16", "float": "fp32"}.get(dtype, dtype)
    name = device_name or ""
    apple = re.search(r"\bM([1-9])(?:\s+(Pro|Max|Ultra))?\b", name)
    if "Apple" in name and apple:
        key = f"M{apple.group(1)}" + (f" {apple.group(2)}" if apple.group(2) else "")
        return _APPLE_PEAKS.get(key)
    for pattern, peaks in _NVIDIA_PEAKS:
        if re.search(pattern, name, flags=re.I):
            return peaks.get(dtype)
    return None

