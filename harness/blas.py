"""Linux CPU speed for MLX (used by train_mlx.py through prepare.use_tuned_blas and set_blas_threads).

MLX's Linux wheel bundles the netlib reference BLAS, about 50x slower at matmul than a
tuned one. When OpenBLAS or MKL is installed we re-run the calling script once with it
preloaded (LD_PRELOAD wins symbol lookup over the bundled library). Opt out with
AUTORESEARCH_BLAS=bundled, or name a library with AUTORESEARCH_BLAS=/path/to/libopenblas.so.0.
The trainer's BLAS_THREADS then caps that library's threads (set_blas_threads).
"""
import os
import sys

TUNED_BLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",   # Debian/Ubuntu libopenblas0-pthread
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",                                   # Fedora
    "/usr/lib/x86_64-linux-gnu/libmkl_rt.so",                        # Debian intel-mkl
    "/opt/intel/oneapi/mkl/latest/lib/libmkl_rt.so.2",              # oneAPI
    "/opt/intel/oneapi/mkl/latest/lib/intel64/libmkl_rt.so.2",
]
# OpenBLAS falls back to these slow generic kernels on CPUs its build does not know
# (Debian's 0.3.21 on some recent server parts); then we name the core ourselves.
GENERIC_OPENBLAS_CORES = {"prescott", "core2", "katmai", "coppermine", "northwood", "banias", "unknown"}
BLAS_REEXEC_MARKER = "_AUTORESEARCH_TUNED_BLAS"


def bundled_reference_blas():
    """Path of the reference BLAS shipped inside the mlx wheel, or None (macOS, CUDA builds)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(list(spec.submodule_search_locations)[0])
    for folder in (pkg.parent / "mlx_cpu.libs", pkg / "lib"):
        for lib in sorted(folder.glob("libblas*.so*")):
            return str(lib)
    return None


def find_tuned_blas():
    choice = os.environ.get("AUTORESEARCH_BLAS", "auto")
    if choice not in ("", "auto"):
        if not os.path.exists(choice):
            sys.exit(f"AUTORESEARCH_BLAS={choice}: no such file. Set it to a libopenblas/libmkl_rt path, "
                     "'auto' or 'bundled'.")
        return choice
    return next((p for p in TUNED_BLAS_CANDIDATES if os.path.exists(p)), None)


def openblas_coretype_override(lib_path):
    """A core name for OPENBLAS_CORETYPE when this OpenBLAS would fall back to generic kernels."""
    if "openblas" not in os.path.basename(lib_path) or "OPENBLAS_CORETYPE" in os.environ:
        return None
    import ctypes
    try:
        lib = ctypes.CDLL(lib_path)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        core = lib.openblas_get_corename().decode().lower()
    except (OSError, AttributeError):
        return None
    if core not in GENERIC_OPENBLAS_CORES:
        return None
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    if " avx512f" in flags:
        return "SkylakeX"
    if " avx2" in flags:
        return "Haswell"
    return None


def use_tuned_blas():
    """Re-exec this script once with a tuned BLAS preloaded, if MLX would use its reference BLAS."""
    if sys.platform != "linux":
        return
    if os.environ.get(BLAS_REEXEC_MARKER):
        print(os.environ[BLAS_REEXEC_MARKER], flush=True)
        return
    if os.environ.get("AUTORESEARCH_BLAS") == "bundled":
        return
    bundled = bundled_reference_blas()
    if bundled is None:
        return
    lib = find_tuned_blas()
    if lib is None:
        print(f"blas: MLX uses its bundled reference BLAS ({os.path.basename(bundled)}), ~50x slower matmul on CPU. "
              "Install OpenBLAS (apt install libopenblas0-pthread) or MKL for fast CPU training.", flush=True)
        return
    if not os.path.isfile(sys.argv[0]):
        return  # not started from a script file (python -c, REPL): nothing to re-run
    env = dict(os.environ)
    env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    coretype = openblas_coretype_override(lib)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    env[BLAS_REEXEC_MARKER] = (f"blas: preloaded {lib}" + (f" (OPENBLAS_CORETYPE={coretype})" if coretype else "")
                               + " over MLX's bundled reference BLAS; opt out with AUTORESEARCH_BLAS=bundled")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def set_blas_threads(n):
    """Caps the preloaded OpenBLAS or MKL at n threads (0 or None: leave its default, one per
    core); returns a line saying what was set, or None where neither is loaded (macOS, CUDA).

    Why: on a CPU the trainer's loss already runs on parallel MLX streams; a small model's
    matmuls gain little from a second BLAS thread, whose spin-waiting takes a core from them.
    """
    if not n or sys.platform != "linux":
        return None
    import ctypes
    loaded = ctypes.CDLL(None)  # the process's global symbols, the LD_PRELOADed BLAS among them
    for setter in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        if hasattr(loaded, setter):
            getattr(loaded, setter)(ctypes.c_int(n))
            return f"blas: {n} thread{'s' if n > 1 else ''} ({setter})"
    return None
