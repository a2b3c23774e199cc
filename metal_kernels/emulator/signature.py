"""The kernel text MLX builds around an `mx.fast.metal_kernel` body, rebuilt in Python.

mx.fast.metal_kernel(name, input_names, output_names, source, header) wraps `source` in a
generated signature (facts from ml-explore/mlx, mlx/fast.cpp `write_signature`):

- `template <typename T, int D, bool B>` when template arguments are given;
- each input as `const device T* name` (`const constant T* name` when it has fewer than 8
  elements, `const constant T& name` when it is 0-d), followed by `const constant int*
  name_shape`, `const constant int64_t* name_strides`, `const constant int& name_ndim`, each
  only when the source contains that identifier (0-d inputs never get them);
- each output as `device T* name`;
- each thread attribute from a fixed list, only when the source contains its name;
- the kernel is named `custom_kernel_<name>[_<template>]_<input types>_<output types>` and,
  when templated, explicitly instantiated under that host name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MAX_CONSTANT_ARRAY_SIZE = 8

# The attributes MLX recognises, in the order it emits them, with their types.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# dtype name -> (MSL type string as MLX's get_type_string writes it, numpy storage dtype)
DTYPES = {
    "float32": ("float", np.float32),
    "float16": ("float16_t", np.float16),
    "bfloat16": ("bfloat16_t", np.uint16),  # numpy has no bfloat16: stored as its bits
    "bool": ("bool", np.bool_),
    "int8": ("int8_t", np.int8),
    "int16": ("int16_t", np.int16),
    "int32": ("int32_t", np.int32),
    "int64": ("int64_t", np.int64),
    "uint8": ("uint8_t", np.uint8),
    "uint16": ("uint16_t", np.uint16),
    "uint32": ("uint32_t", np.uint32),
    "uint64": ("uint64_t", np.uint64),
}


def dtype_name(dtype) -> str:
    """Normalises an mx.Dtype, numpy dtype or string to one of DTYPES' keys."""
    if isinstance(dtype, str):
        name = dtype
    else:
        text = str(dtype)
        if text.startswith("mlx.core."):
            name = text[len("mlx.core."):]
        else:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                name = text
    if name == "bool_":
        name = "bool"
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported by the Metal emulator; use one of {sorted(DTYPES)}")
    return name


def type_string(dtype) -> str:
    return DTYPES[dtype_name(dtype)][0]


@dataclass(frozen=True)
class InputSpec:
    """What the signature depends on for one input array."""

    dtype: str
    ndim: int
    size: int


def shape_infos(source: str, input_names) -> list[tuple[bool, bool, bool]]:
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def attributes(source: str) -> list[tuple[str, str]]:
    return [(name, typ) for name, typ in METAL_ATTRIBUTES if name in source]


def template_value(value) -> tuple[str, str]:
    """(parameter kind, value text) of one template argument, as MLX writes them."""
    if isinstance(value, bool):
        return "bool", "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return "int", str(int(value))
    return "typename", type_string(value)


def write_template(template) -> str:
    return "<" + ", ".join(template_value(v)[1] for _, v in template) + ">"


def kernel_name(name: str, template, inputs: list[InputSpec], output_dtypes) -> str:
    kname = "custom_kernel_" + name
    if template:
        # MLX replaces '<', '>' and ', ' by '_' and drops the trailing '_'.
        kname += "_" + re.sub(r"<|>|, ", "_", write_template(template))[:-1]
    for spec in inputs:
        kname += "_" + type_string(spec.dtype)
        if spec.ndim == 0:
            kname += "s"
        elif spec.size < MAX_CONSTANT_ARRAY_SIZE:
            kname += "c"
    for dt in output_dtypes:
        kname += "_" + type_string(dt)
    return kname


def write_signature(func_name, header, source, input_names, inputs: list[InputSpec], output_names,
                    output_dtypes, template) -> str:
    out = [header]
    if template:
        out.append("template <" + ", ".join(f"{template_value(v)[0]} {n}" for n, v in template) + ">\n")
    out.append(f"[[kernel]] void {func_name}(\n")
    infos = shape_infos(source, input_names)
    attrs = attributes(source)
    params = []
    index = 0
    for name, spec, (has_shape, has_strides, has_ndim) in zip(input_names, inputs, infos):
        location = "constant" if spec.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if spec.ndim == 0 else "*"
        params.append(f"  const {location} {type_string(spec.dtype)}{ref} {name} [[buffer({index})]]")
        index += 1
        if spec.ndim > 0:
            if has_shape:
                params.append(f"  const constant int* {name}_shape [[buffer({index})]]")
                index += 1
            if has_strides:
                params.append(f"  const constant int64_t* {name}_strides [[buffer({index})]]")
                index += 1
            if has_ndim:
                params.append(f"  const constant int& {name}_ndim [[buffer({index})]]")
                index += 1
    for name, dt in zip(output_names, output_dtypes):
        params.append(f"  device {type_string(dt)}* {name} [[buffer({index})]]")
        index += 1
    for name, typ in attrs:
        params.append(f"  {typ} {name} [[{name}]]")
    out.append(",\n".join(params) + ") {\n")
    out.append(source)
    out.append("\n}\n")
    return "".join(out)


def generate(name, input_names, output_names, source, header, inputs: list[InputSpec], output_dtypes,
             template) -> tuple[str, str]:
    """(kernel name, full kernel text) exactly as MLX hands them to the Metal compiler,
    minus the `metal::utils()` preamble that MLX prepends (the emulator's header replaces it)."""
    template = list(template or [])
    kname = kernel_name(name, template, inputs, output_dtypes)
    text = write_signature(kname, header, source, input_names, inputs, output_names, output_dtypes, template)
    if template:
        tdef = kname + write_template(template)
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return kname, text
