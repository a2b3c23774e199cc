"""A CPU emulator for `mx.fast.metal_kernel` bodies, so Linux CI runs the real Metal source.

    kernel = metal_kernel(name=..., input_names=[...], output_names=[...], source=..., header=...)
    outs = kernel(inputs=[np arrays or mx arrays], template=[("T", "float32"), ("D", 64)],
                  grid=(gx, gy, gz), threadgroup=(tx, ty, tz), output_shapes=[...],
                  output_dtypes=[...], init_value=float("nan"), schedule=0)

The call mirrors mx.fast.metal_kernel. The kernel text is generated the way MLX generates it
(signature.py), compiled as C++ against msl_cpu.h (compiler.py, cached by content hash) and
run with one fiber per GPU thread. `schedule` picks the order in which threads and groups are
run (0 forward, 1 reverse, >= 2 shuffled with that seed): running a kernel under two
schedules and comparing shows races. Outputs come back as numpy arrays (bfloat16 as float32,
which holds every bfloat16 exactly). Errors (deadlocks, Metal limits, writes outside an
output) raise EmulatorError.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from .compiler import EmulatorError, compile_library, launcher, runtime_api, to_cpp
from .signature import DTYPES, InputSpec, dtype_name, generate, shape_infos, attributes, type_string

__all__ = ["metal_kernel", "EmulatorError", "bfloat16_bits", "bfloat16_to_float32", "to_numpy_input"]

MAX_THREADS_PER_THREADGROUP = 1024
MAX_THREADGROUP_MEMORY = 32768
GUARD = 64  # canary bytes on each side of every output buffer


class _Launch(ctypes.Structure):  # mirrors mslcpu::Launch
    _fields_ = [
        ("grid", ctypes.c_uint32 * 3),
        ("threadgroup", ctypes.c_uint32 * 3),
        ("schedule", ctypes.c_int32),
        ("workers", ctypes.c_int32),
        ("tg_mem_limit", ctypes.c_int64),
        ("max_threads", ctypes.c_int32),
        ("_pad", ctypes.c_int32),
        ("error", ctypes.c_char * 1024),
    ]


def bfloat16_bits(x) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bfloat16_to_float32(bits) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_numpy_input(x) -> tuple[np.ndarray, str]:
    """(contiguous storage array, dtype name) for an mx.array, numpy array or Python scalar."""
    if type(x).__module__.startswith("mlx"):
        import mlx.core as mx

        name = dtype_name(x.dtype)
        if name == "bfloat16":
            return np.array(x.view(mx.uint16), order="C"), name
        return np.array(x, order="C"), name
    if isinstance(x, (bool, int, float)):
        x = np.array(x, dtype=np.bool_ if isinstance(x, bool) else np.int32 if isinstance(x, int) else np.float32)
    x = np.array(x, order="C")  # a copy: 0-d stays 0-d (ascontiguousarray would make it 1-d)
    return x, dtype_name(x.dtype)


def _default_workers() -> int:
    env = os.environ.get("METAL_EMULATOR_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


class _Kernel:
    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True):
        if not output_names:
            raise ValueError("metal_kernel needs at least one output name")
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.ensure_row_contiguous = ensure_row_contiguous

    def generated(self, inputs: list[InputSpec], template, output_dtypes) -> tuple[str, str]:
        """(kernel name, kernel text) as MLX would generate them for this call."""
        return generate(self.name, self.input_names, self.output_names, self.source, self.header, inputs,
                        [dtype_name(d) for d in output_dtypes], template)

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, schedule=0, workers=None, verbose=False):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs ({self.input_names}), got {len(inputs)}")
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(self.output_names):
            raise ValueError(f"expected output_shapes and output_dtypes for {self.output_names}")
        template = list(template or [])
        arrays = [to_numpy_input(x) for x in inputs]
        specs = [InputSpec(name, a.ndim, a.size) for a, name in arrays]
        out_names = [dtype_name(d) for d in output_dtypes]
        kname, text = self.generated(specs, template, out_names)
        if verbose:
            print(text)

        # argument slots in signature order, with the C++ type the launcher casts each to
        infos = shape_infos(self.source, self.input_names)
        slots, keep = [], []
        for (arr, name), spec, (has_shape, has_strides, has_ndim) in zip(arrays, specs, infos):
            if spec.ndim == 0:
                slots.append(("ref", type_string(name), arr))
            else:
                slots.append(("ptr", f"const {type_string(name)}*", arr))
            if spec.ndim > 0:
                if has_shape:
                    slots.append(("ptr", "const int*", np.array(arr.shape, dtype=np.int32)))
                if has_strides:
                    strides = np.array([s // arr.itemsize for s in arr.strides], dtype=np.int64)
                    slots.append(("ptr", "const int64_t*", strides))
                if has_ndim:
                    slots.append(("ref", "int", np.array(arr.ndim, dtype=np.int32)))
        out_buffers = []
        for shape, name in zip(output_shapes, out_names):
            storage = DTYPES[name][1]
            n = int(np.prod(shape, dtype=np.int64))
            itemsize = np.dtype(storage).itemsize
            raw = np.full(n * itemsize + 2 * GUARD, 0xA5, dtype=np.uint8)
            body = raw[GUARD:GUARD + n * itemsize].view(storage).reshape(shape)
            if init_value is not None:
                if name == "bfloat16":
                    body[...] = bfloat16_bits(np.float32(init_value))
                else:
                    body[...] = np.asarray(init_value).astype(storage)
            else:  # MLX leaves outputs uninitialised: poison them so unwritten elements show
                raw[GUARD:GUARD + n * itemsize] = 0xFF
            out_buffers.append((raw, body, name))
            slots.append(("ptr", f"{type_string(name)}*", body))
        arg_types = [(kind, ctype) for kind, ctype, _ in slots]
        attrs = [a for a, _ in attributes(self.source)]

        cpp = to_cpp(text) + launcher(kname, template, arg_types, attrs)
        lib = compile_library(cpp)
        # METAL_EMULATOR_UCONTEXT=1 forces the portable ucontext fibers (the default off x86-64 Linux)
        api = runtime_api(ucontext=os.environ.get("METAL_EMULATOR_UCONTEXT") == "1")

        launch = _Launch()
        launch.grid[:] = [int(g) for g in grid]
        launch.threadgroup[:] = [int(t) for t in threadgroup]
        launch.schedule = int(schedule)
        launch.workers = int(workers or _default_workers())
        launch.tg_mem_limit = MAX_THREADGROUP_MEMORY
        launch.max_threads = MAX_THREADS_PER_THREADGROUP
        ptrs = (ctypes.c_void_p * max(1, len(slots)))()
        for i, (_, _, arr) in enumerate(slots):
            keep.append(arr)
            ptrs[i] = arr.ctypes.data
        rc = lib.mslemu_launch(ctypes.addressof(launch), ptrs, api)
        if rc != 0:
            raise EmulatorError(f"kernel {self.name}: {launch.error.decode(errors='replace')}")
        results = []
        for (raw, body, name), out_name in zip(out_buffers, self.output_names):
            if (raw[:GUARD] != 0xA5).any() or (raw[len(raw) - GUARD:] != 0xA5).any():
                raise EmulatorError(f"kernel {self.name}: wrote outside output `{out_name}` (out-of-bounds index)")
            results.append(bfloat16_to_float32(body) if name == "bfloat16" else body.copy())
        return results


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True, **_ignored):
    """The emulator's counterpart of mx.fast.metal_kernel (same arguments)."""
    return _Kernel(name, input_names, output_names, source, header, ensure_row_contiguous)
