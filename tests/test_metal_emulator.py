"""The CPU emulator of mx.fast.metal_kernel: signature generation, MSL semantics, error reports."""

import mlx.core as mx
import numpy as np
import pytest

from metal_kernels.emulator import EmulatorError, bfloat16_bits, bfloat16_to_float32, metal_kernel
from metal_kernels.emulator.compiler import find_compiler
from metal_kernels.emulator.signature import InputSpec, generate

try:
    find_compiler()
except EmulatorError as e:  # pragma: no cover - CI installs clang
    pytest.skip(str(e), allow_module_level=True)


def run1(source, inputs, input_names, out_shape, out_dtype=np.float32, grid=(32, 1, 1), tg=(32, 1, 1),
         template=None, header="", **kw):
    k = metal_kernel(name="t", input_names=input_names, output_names=["out"], source=source, header=header)
    (out,) = k(inputs=inputs, template=template, grid=grid, threadgroup=tg, output_shapes=[out_shape],
               output_dtypes=[out_dtype], **kw)
    return out


# ---------------------------------------------------------------- signature, as MLX writes it

def test_signature_matches_mlx_generation_rules():
    source = "uint i = thread_position_in_grid.x; out[i] = a[i] * a_shape[0] + T(s) + N; (void)simdgroup_index_in_threadgroup;"
    specs = [InputSpec("float32", 2, 64), InputSpec("float32", 0, 1), InputSpec("int32", 1, 3)]
    name, text = generate("k", ["a", "s", "small"], ["out"], source, "// hdr\n", specs, ["float16"],
                          [("T", "float32"), ("N", 3), ("B", True)])
    assert name == "custom_kernel_k__float_3_1_float_floats_int32_tc_float16_t"
    expected_signature = (
        "// hdr\n"
        "template <typename T, int N, bool B>\n"
        f"[[kernel]] void {name}(\n"
        "  const device float* a [[buffer(0)]],\n"
        "  const constant int* a_shape [[buffer(1)]],\n"       # only _shape: the source names only it
        "  const constant float& s [[buffer(2)]],\n"           # 0-d input: by reference, no shape
        "  const constant int32_t* small [[buffer(3)]],\n"     # < 8 elements: constant address space
        "  device float16_t* out [[buffer(4)]],\n"
        "  uint simdgroup_index_in_threadgroup [[simdgroup_index_in_threadgroup]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n")
    assert text.startswith(expected_signature)
    assert text.endswith(f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({name}<float, 3, 1>) {name}<float, 3, 1>;\n')


def test_strides_ndim_and_untemplated_kernel_run():
    src = """
      uint i = thread_position_in_grid.x;
      if (i < 6) out[i] = float(a_strides[0] * 100 + a_strides[1] * 10 + a_ndim) + a[i];
    """
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = run1(src, [a], ["a"], (6,), grid=(6, 1, 1), tg=(32, 1, 1))
    np.testing.assert_array_equal(out, 300 + 10 + 2 + np.arange(6))


def test_thread_attributes_and_non_uniform_grid():
    # 2-D grid 5x3 with 4x2 groups: edge groups are smaller (MLX dispatches threads, not groups)
    src = """
      uint3 p = thread_position_in_grid;
      uint idx = p.y * 5 + p.x;
      out[idx * 4 + 0] = threadgroup_position_in_grid.x * 10 + threadgroup_position_in_grid.y;
      out[idx * 4 + 1] = threads_per_threadgroup.x * 10 + threads_per_threadgroup.y;
      out[idx * 4 + 2] = thread_index_in_threadgroup;
      out[idx * 4 + 3] = threadgroups_per_grid.x * 10 + threadgroups_per_grid.y;
    """
    out = run1(src, [np.zeros(1, np.float32)], ["unused"], (60,), out_dtype=np.uint32, grid=(5, 3, 1), tg=(4, 2, 1))
    out = out.reshape(3, 5, 4)
    y, x = np.mgrid[0:3, 0:5]
    np.testing.assert_array_equal(out[..., 0], (x // 4) * 10 + y // 2)
    np.testing.assert_array_equal(out[..., 1], np.where(x < 4, 4, 1) * 10 + np.where(y < 2, 2, 1))
    np.testing.assert_array_equal(out[..., 2], (y % 2) * np.where(x < 4, 4, 1) + x % 4)
    np.testing.assert_array_equal(out[..., 3], np.full((3, 5), 22))


# ---------------------------------------------------------------- simd collectives, matrices

def test_simd_collectives():
    src = """
      uint i = thread_position_in_grid.x;
      ushort l = thread_index_in_simdgroup;
      float x = a[i];
      out[i * 8 + 0] = simd_sum(x);
      out[i * 8 + 1] = simd_max(x);
      out[i * 8 + 2] = simd_min(x);
      out[i * 8 + 3] = simd_shuffle(x, (l * 7) % 32);
      out[i * 8 + 4] = simd_shuffle_xor(x, 5);
      out[i * 8 + 5] = simd_shuffle_down(x, 3);
      out[i * 8 + 6] = simd_prefix_exclusive_sum(x);
      out[i * 8 + 7] = simd_broadcast(x, 9);
    """
    a = np.random.default_rng(0).integers(-50, 50, 64).astype(np.float32)
    out = run1(src, [a], ["a"], (64 * 8,), grid=(64, 1, 1), tg=(64, 1, 1)).reshape(2, 32, 8)
    g = a.reshape(2, 32)
    lanes = np.arange(32)
    for s in range(2):
        np.testing.assert_array_equal(out[s, :, 0], g[s].sum())
        np.testing.assert_array_equal(out[s, :, 1], g[s].max())
        np.testing.assert_array_equal(out[s, :, 2], g[s].min())
        np.testing.assert_array_equal(out[s, :, 3], g[s][(lanes * 7) % 32])
        np.testing.assert_array_equal(out[s, :, 4], g[s][lanes ^ 5])
        np.testing.assert_array_equal(out[s, :29, 5], g[s][3:])
        np.testing.assert_array_equal(out[s, :, 6], np.concatenate([[0], np.cumsum(g[s])[:-1]]))
        np.testing.assert_array_equal(out[s, :, 7], g[s][9])


def test_simdgroup_matrix_load_store_multiply_accumulate():
    # D = A @ B + C with 8x8 matrices, B loaded transposed from its transpose in memory.
    src = """
      simdgroup_matrix<float, 8, 8> A, B, C, D;
      simdgroup_float8x8 I = simdgroup_float8x8(2.0f), F = make_filled_simdgroup_matrix<float, 8, 8>(0.5f);
      simdgroup_load(A, a, 8);
      simdgroup_load(B, bt, 8, ulong2(0, 0), true);
      simdgroup_load(C, c + 8, 8);
      simdgroup_multiply_accumulate(D, A, B, C);
      simdgroup_store(D, out, 16, ulong2(8, 0));
      simdgroup_multiply(C, I, F);  // diagonal 2 times all-0.5: all ones
      simdgroup_store(C, out, 16, ulong2(0, 0));
    """
    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
    c_buf = np.concatenate([np.zeros(8, np.float32), c.ravel()])
    out = run1(src, [a, np.ascontiguousarray(b.T), c_buf], ["a", "bt", "c"], (8 * 16,), init_value=0.0)
    out = out.reshape(8, 16)
    np.testing.assert_allclose(out[:, 8:], a @ b + c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[:, :8], 1.0)


def test_half_and_bfloat_conversions_round_like_numpy_and_mlx():
    src = """
      uint i = thread_position_in_grid.x;
      if (i < n_shape[0]) { h[i] = half(x[i]); bf[i] = bfloat(x[i]); back[i] = float(half(x[i])) + 0.0f; }
    """
    rng = np.random.default_rng(2)
    special = np.array([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e-8, 3e-5, 6.1e-5, 2.0 ** -24, 2.0 ** -25,
                        2.0 ** -25 * 1.0001, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8,
                        np.inf, -np.inf, 3.4e38], dtype=np.float32)
    x = np.concatenate([special, (rng.standard_normal(2000) * np.exp(rng.uniform(-20, 12, 2000))).astype(np.float32)])
    k = metal_kernel(name="conv", input_names=["x", "n"], output_names=["h", "bf", "back"], source=src)
    n = len(x)
    h, bf, back = k(inputs=[x, np.zeros(n, np.int8)], grid=(n, 1, 1), threadgroup=(256, 1, 1),
                    output_shapes=[(n,), (n,), (n,)], output_dtypes=["float16", "bfloat16", "float32"])
    with np.errstate(over="ignore"):
        x16 = x.astype(np.float16)
    np.testing.assert_array_equal(h.view(np.uint16), x16.view(np.uint16))
    mlx_bf = np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))
    np.testing.assert_array_equal(bf, mlx_bf)
    np.testing.assert_array_equal(bfloat16_to_float32(bfloat16_bits(x)), mlx_bf)
    np.testing.assert_array_equal(back, x16.astype(np.float32))


# ---------------------------------------------------------------- errors: deadlocks, limits, bounds

def test_divergent_barrier_is_reported_as_deadlock():
    src = """
      if (thread_index_in_threadgroup == 3) return;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      out[thread_position_in_grid.x] = 1.0f;
    """
    with pytest.raises(EmulatorError, match="threadgroup_barrier reached by 63 threads while 1"):
        run1(src, [np.zeros(1, np.float32)], ["unused"], (64,), grid=(64, 1, 1), tg=(64, 1, 1))


def test_collective_split_across_barrier_is_a_deadlock():
    src = """
      float x = 1.0f;
      if (thread_index_in_simdgroup < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); x = simd_sum(x); }
      else { x = simd_sum(x); threadgroup_barrier(mem_flags::mem_threadgroup); }
      out[thread_position_in_grid.x] = x;
    """
    with pytest.raises(EmulatorError, match="deadlock"):
        run1(src, [np.zeros(1, np.float32)], ["unused"], (32,))


def test_lanes_at_different_collectives_are_reported():
    src = """
      float x = 1.0f;
      x = thread_index_in_simdgroup < 16 ? simd_sum(x) : simd_max(x);
      out[thread_position_in_grid.x] = x;
    """
    with pytest.raises(EmulatorError, match="divergent simd collectives"):
        run1(src, [np.zeros(1, np.float32)], ["unused"], (32,))


def test_metal_limits_are_checked():
    big = """
      threadgroup float buf[8193];
      buf[thread_index_in_threadgroup] = 1.0f;
      out[thread_position_in_grid.x] = buf[0];
    """
    with pytest.raises(EmulatorError, match="threadgroup memory 32772 bytes exceeds the Metal limit of 32768"):
        run1(big, [np.zeros(1, np.float32)], ["unused"], (32,))
    with pytest.raises(EmulatorError, match="1056 threads exceeds the Metal limit of 1024"):
        run1("out[0] = 1.0f;", [np.zeros(1, np.float32)], ["unused"], (1,), grid=(1056, 1, 1), tg=(1056, 1, 1))


def test_out_of_bounds_write_is_caught():
    src = "out[thread_position_in_grid.x + 1] = 1.0f;"
    with pytest.raises(EmulatorError, match="wrote outside output `out`"):
        run1(src, [np.zeros(1, np.float32)], ["unused"], (32,))


def test_threadgroup_memory_is_shared_and_starts_poisoned():
    src = """
      threadgroup float buf[64];
      threadgroup float never_written[64];
      uint t = thread_index_in_threadgroup;
      buf[t] = float(t);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      out[thread_position_in_grid.x * 2] = buf[63 - t];
      out[thread_position_in_grid.x * 2 + 1] = never_written[t];
    """
    out = run1(src, [np.zeros(1, np.float32)], ["unused"], (256,), grid=(128, 1, 1), tg=(64, 1, 1)).reshape(2, 64, 2)
    np.testing.assert_array_equal(out[:, :, 0], np.tile(np.arange(63, -1, -1), (2, 1)))
    assert np.isnan(out[:, :, 1]).all()


def test_schedules_expose_a_race():
    # Every thread writes its id to the same threadgroup cell without a barrier: the survivor
    # depends on the order threads run. A correct kernel gives the same bits under all schedules.
    src = """
      threadgroup int cell[1];
      cell[0] = thread_index_in_threadgroup;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      out[thread_position_in_grid.x] = cell[0];
    """
    outs = [run1(src, [np.zeros(1, np.float32)], ["unused"], (64,), out_dtype=np.int32, grid=(64, 1, 1),
                 tg=(64, 1, 1), schedule=s) for s in (0, 1)]
    assert not np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("env", [{"METAL_EMULATOR_WORKERS": "1"}, {"METAL_EMULATOR_WORKERS": "2"},
                                 {"METAL_EMULATOR_UCONTEXT": "1"}])
def test_workers_and_ucontext_fibers_agree(monkeypatch, env):
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    src = """
      threadgroup float acc[4];
      uint t = thread_index_in_threadgroup;
      float s = simd_sum(a[thread_position_in_grid.x]);
      if (thread_index_in_simdgroup == 0) acc[simdgroup_index_in_threadgroup] = s;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (t == 0) out[threadgroup_position_in_grid.x] = acc[0] + acc[1] + acc[2] + acc[3];
    """
    a = np.arange(128 * 16, dtype=np.float32)
    out = run1(src, [a], ["a"], (16,), grid=(128 * 16, 1, 1), tg=(128, 1, 1))
    np.testing.assert_array_equal(out, a.reshape(16, 128).sum(1))


def test_signature_generator_matches_mlx_byte_for_byte(capfd, tmp_path):
    """MLX writes the kernel text it generates when verbose=True. Without Metal it can still
    trace a metal_kernel call for mx.export_function: capture its text for each attention
    kernel and dtype and compare with the emulator's generator."""
    from metal_kernels import kernels as K

    if mx.metal.is_available():
        pytest.skip("on a Metal device verbose printing happens at evaluation; this check is for CPU hosts")
    calls = [make((1, 2, 40, D), dtype) for make in (K.forward_call, K.dq_call, K.dkdv_call)
             for D in K.HEAD_DIMS for dtype in K.DTYPES]
    for i, call in enumerate(calls):
        kern = mx.fast.metal_kernel(name=call.name, input_names=call.input_names, output_names=call.output_names,
                                    source=call.source, header=call.header)
        dtype = getattr(mx, call.template[0][1])
        x = mx.zeros((1, 2, 40, call.template[1][1]), dtype=dtype)
        row = mx.zeros((1, 2, 40), dtype=mx.float32)
        args = {"q": x, "k": x, "v": x, "dout": x, "lse": row, "delta": row,
                "window": mx.array(40, dtype=mx.int32), "scale": mx.array(0.125, dtype=mx.float32)}

        def traced(x, call=call, kern=kern, args=args):
            inputs = [x if n in ("q", "k", "v", "dout") else args[n] for n in call.input_names]
            return kern(inputs=inputs, template=[(n, getattr(mx, v) if isinstance(v, str) else v) for n, v in call.template],
                        grid=call.grid, threadgroup=call.threadgroup, output_shapes=call.output_shapes,
                        output_dtypes=[getattr(mx, d) for d in call.output_dtypes], verbose=True)

        mx.export_function(str(tmp_path / f"k{i}.mlxfn"), traced, x)
        printed = capfd.readouterr().out
        mlx_text = printed.split("```\n", 1)[1].rsplit("\n```", 1)[0]
        arrays = [x if n in ("q", "k", "v", "dout") else args[n] for n in call.input_names]
        specs = [InputSpec(str(a.dtype).split(".")[-1], a.ndim, a.size) for a in arrays]
        _, ours = generate(call.name, call.input_names, call.output_names, call.source, call.header, specs,
                           call.output_dtypes, call.template)
        assert ours == mlx_text, f"{call.name} {call.template}: emulator signature differs from MLX's"


def test_source_that_does_not_compile_is_reported_with_the_compiler_message():
    with pytest.raises(EmulatorError, match=r"does not compile(.|\n)*undeclared identifier 'no_such_name'"):
        run1("out[0] = no_such_name;", [np.zeros(1, np.float32)], ["unused"], (1,))
