"""Turns MLX's kernel text into a C++ shared library and caches it by content hash.

The kernel text (signature + body) is compiled unchanged except for two rewrites that C++
needs: kernel-scope `threadgroup` variable declarations become allocations from the
emulated group's threadgroup memory (so the emulator can share them between the group's
threads, poison them and check the 32 KB limit), and the `[[host_name]] [[kernel]]`
attributes of the explicit instantiation are dropped (C++ does not allow them there). A
generated launcher casts the argument buffers and calls the kernel once per GPU thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

HEADER = Path(__file__).with_name("msl_cpu.h")
RUNTIME = Path(__file__).with_name("msl_runtime.cpp")
CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-w", "-fno-strict-aliasing"]


class EmulatorError(RuntimeError):
    """A kernel failed to compile or run in the emulator (deadlock, limit, bad launch)."""


def cache_dir() -> Path:
    root = os.environ.get("METAL_EMULATOR_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metal_kernels_emulator"


def find_compiler() -> str:
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return cxx
    for cand in ("clang++", "clang++-19", "clang++-18", "clang++-17", "clang++-16", "clang++-15", "clang++-14"):
        path = shutil.which(cand)
        if path:
            return path
    raise EmulatorError("the Metal emulator needs clang++ (ext_vector_type): install it, e.g. "
                        "`apt-get install clang` on Debian/Ubuntu or Xcode's command line tools on macOS, "
                        "or point $CXX at it")


_DECL = re.compile(r"^([ \t]*)threadgroup[ \t]+([^;{}()]*?);", re.MULTILINE)


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<[(":
            depth += 1
        elif ch in ">])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _rewrite_decl(match: re.Match) -> str:
    indent, decl = match.group(1), match.group(2).strip()
    outside_brackets = re.sub(r"\[[^\]]*\]", "", decl)
    if "*" in outside_brackets or "&" in outside_brackets or "=" in outside_brackets:
        return f"{indent}{decl};"  # a pointer/reference into threadgroup memory: no storage
    first, *others = _split_top_level(decl)
    fm = re.match(r"^(.*?\S)\s+(\w+)\s*((?:\[[^\]]*\]\s*)*)$", first)
    if fm is None:
        raise EmulatorError(f"cannot emulate the threadgroup declaration `threadgroup {decl};`")
    type_part = fm.group(1)
    declarators = [(fm.group(2), fm.group(3))]
    for d in others:
        dm = re.match(r"^(\w+)\s*((?:\[[^\]]*\]\s*)*)$", d)
        if dm is None:
            raise EmulatorError(f"cannot emulate the threadgroup declaration `threadgroup {decl};`")
        declarators.append((dm.group(1), dm.group(2)))
    allocs = [f"auto& {name} = *::mslcpu::tg_alloc<{type_part}{dims.strip()}>();" for name, dims in declarators]
    return indent + " ".join(allocs)


def to_cpp(kernel_text: str) -> str:
    text = _DECL.sub(_rewrite_decl, kernel_text)
    text = re.sub(r"template\s*\[\[host_name\([^)]*\)\]\]\s*\[\[kernel\]\]", "template", text)
    return text


def launcher(kname: str, template, arg_types: list[tuple[str, str]], attrs: list[str]) -> str:
    """C++ that calls the kernel for one thread. arg_types: (kind, C++ type) per buffer slot,
    kind 'ptr' (pointer argument) or 'ref' (0-d input passed by reference)."""
    from .signature import write_template

    fn = kname + (write_template(template) if template else "")
    args = []
    for i, (kind, ctype) in enumerate(arg_types):
        args.append(f"*(const {ctype}*)p[{i}]" if kind == "ref" else f"({ctype})p[{i}]")
    args += [f"a.{name}" for name in attrs]
    return (
        "\nnamespace {\n"
        "void mslemu_body(void* ctx, const ::mslcpu::Attrs& a) {\n"
        "  void** p = (void**)ctx; (void)p; (void)a;\n"
        f"  {fn}({', '.join(args)});\n"
        "}\n}\n"
        'extern "C" int mslemu_launch(::mslcpu::Launch* L, void** args, const ::mslcpu::Api* api) {\n'
        "  ::mslcpu::api() = api;\n"
        "  return api->launch(L, &mslemu_body, (void*)args);\n}\n"
    )


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def _pch() -> list[str]:
    """Flags to use msl_cpu.h precompiled (parsing <cmath> is most of a kernel's compile time);
    [] if the compiler cannot build one. Built once per header, flags and compiler."""
    flags = [f for f in CXXFLAGS if f != "-shared"]
    cxx = find_compiler()
    key = hashlib.sha256("\0".join([HEADER.read_text(), " ".join(flags), cxx]).encode()).hexdigest()[:24]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    pch = out_dir / f"msl_cpu_{key}.pch"
    if not pch.exists():
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".pch.tmp")
        os.close(fd)
        proc = subprocess.run([cxx, *flags, "-x", "c++-header", str(HEADER), "-o", tmp], capture_output=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            return []
        os.replace(tmp, pch)
    return ["-include-pch", str(pch)]


def _build(kind: str, text: str, flags: list[str], key_parts: list[str], extra: tuple[str, ...] = ()) -> Path:
    """Compiles `text` into a shared library in the cache (once per content hash)."""
    key = hashlib.sha256("\0".join(key_parts + [text, " ".join(flags)]).encode()).hexdigest()[:24]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"{kind}_{key}.so"
    if lib_path.exists():
        return lib_path
    src_path = out_dir / f"{kind}_{key}.cpp"
    src_path.write_text(text)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    cmd = [find_compiler(), *flags, *extra, f"-I{HEADER.parent}", str(src_path), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and extra:  # e.g. a precompiled header from another compiler version
        cmd = [find_compiler(), *flags, f"-I{HEADER.parent}", str(src_path), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise EmulatorError(f"the {kind} does not compile as C++ against msl_cpu.h "
                            f"(source kept at {src_path}):\n{proc.stderr[-6000:]}")
    os.replace(tmp, lib_path)  # atomic: concurrent test processes never load half a file
    return lib_path


def _load(path: Path) -> ctypes.CDLL:
    if str(path) not in _loaded:
        _loaded[str(path)] = ctypes.CDLL(str(path))
    return _loaded[str(path)]


def runtime_api(ucontext: bool = False) -> int:
    """Address of the scheduler's Api table (msl_runtime.cpp, built once per configuration)."""
    flags = CXXFLAGS + (["-DMSLCPU_UCONTEXT"] if ucontext else [])
    with _lock:
        path = _build("runtime", RUNTIME.read_text(), flags, [HEADER.read_text()])
        lib = _load(path)
        lib.mslcpu_api.restype = ctypes.c_void_p
        return lib.mslcpu_api()


def compile_library(cpp_body: str) -> ctypes.CDLL:
    """Compiles `#include "msl_cpu.h"` + cpp_body into a kernel library (cached by hash)."""
    with _lock:
        text = '#include "msl_cpu.h"\n' + cpp_body
        path = _build("kernel", text, CXXFLAGS, [HEADER.read_text()], extra=tuple(_pch()))
        lib = _load(path)
        lib.mslemu_launch.restype = ctypes.c_int
        lib.mslemu_launch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        return lib
