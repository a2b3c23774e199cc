"""Flash-attention forward and backward as `mx.fast.metal_kernel` sources, with their launch
parameters. These exact strings are what runs on a Mac and what the CPU emulator runs in CI.

Layout: q, k, v, dO are (B, H, T, D) row-contiguous; lse and delta are (B, H, T) float32.
Window convention (shared with the trainers): query i sees key j iff i - W <= j <= i; the
kernels receive W already clamped to T (plain causal).

Tiles. Work is done in 8x8 simdgroup matrices (float accumulation whatever the input dtype).
- forward and dQ: 32 query rows per threadgroup, 4 simdgroups of 8 rows; keys in blocks of 32
  at head dim 64 and 16 at 128, so K and V blocks in threadgroup memory stay near 16 KB
  (2 * BK * (D + 4) * 4 bytes; rows padded by 4 floats so that the transposed fragment loads,
  8 rows x 8 columns across a simdgroup, fall in 32 distinct banks) and the per-thread fragments (Q, O or dO, dQ) fit in registers.
- dK/dV: parallel over key blocks, so no atomics: 32 keys in 4 simdgroups with 32-query
  blocks at head dim 64; 16 keys in 2 simdgroups with 16-query blocks at 128 (four D-wide
  fragment rows per thread, dK, dV, K, V, would spill with larger tiles). ~17 KB.
Masking. A key block is skipped when the whole block lies outside every row's band (loop
bounds), and masked element by element only when the block straddles the diagonal, the
window edge or the end of the sequence; interior blocks take the unmasked path.
The row max/sum of a fragment row is spread over 4 lanes (lane bits 0 and 3, see the lane
layout below), hence the two simd_shuffle_xor steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Helpers shared by the three kernels (MSL; also valid C++ for the emulator).
HEADER = """
// Lane layout of an 8x8 simdgroup_matrix (as in MLX's steel kernels): lane l holds elements
// (fa_row(l), fa_col(l)) and (fa_row(l), fa_col(l) + 1).
METAL_FUNC short fa_row(ushort lane) { return ((lane / 4) & 4) + (lane / 2) % 4; }
METAL_FUNC short fa_col(ushort lane) { return ((lane / 4) & 2) * 2 + (lane % 2) * 2; }

// Fragment = tile rows [r0, r0 + 8) x cols [c0, c0 + 8) of a row-major threadgroup array.
METAL_FUNC void fa_load(thread simdgroup_matrix<float, 8, 8>& m, const threadgroup float* src,
                        int ld, int r0, int c0, short fr, short fc) {
  m.thread_elements()[0] = src[(r0 + fr) * ld + c0 + fc];
  m.thread_elements()[1] = src[(r0 + fr) * ld + c0 + fc + 1];
}
// Transposed fragment: element (r, c) = src[(r0 + c) * ld + c0 + r].
METAL_FUNC void fa_load_t(thread simdgroup_matrix<float, 8, 8>& m, const threadgroup float* src,
                          int ld, int r0, int c0, short fr, short fc) {
  m.thread_elements()[0] = src[(r0 + fc) * ld + c0 + fr];
  m.thread_elements()[1] = src[(r0 + fc + 1) * ld + c0 + fr];
}
METAL_FUNC void fa_zero(thread simdgroup_matrix<float, 8, 8>& m) {
  m.thread_elements()[0] = 0.0f;
  m.thread_elements()[1] = 0.0f;
}
"""

_PRELUDE = """
  const int T_len = q_shape[2];
  const int H = q_shape[1];
  const int blk = threadgroup_position_in_grid.x;
  const size_t bh = (size_t)threadgroup_position_in_grid.z * H + threadgroup_position_in_grid.y;
  const ushort sg = simdgroup_index_in_threadgroup;
  const ushort lane = thread_index_in_simdgroup;
  const int tid = thread_index_in_threadgroup;
  const short fr = fa_row(lane);
  const short fc = fa_col(lane);
  const int W = window;
  const float sl2 = scale * 1.4426950408889634f;  // softmax in base 2
  const float NEG = -metal::numeric_limits<float>::max();
  const size_t base = bh * (size_t)T_len * D;
"""

FORWARD_SOURCE = _PRELUDE + """
  constexpr int NSG = 4;
  constexpr int BQ = 8 * NSG;
  constexpr int BK = D <= 64 ? 32 : 16;
  constexpr int NT = 32 * NSG;
  constexpr int LD = D + 4;  // padded rows: transposed fragment loads hit 32 distinct banks
  threadgroup float Ks[BK * LD];
  threadgroup float Vs[BK * LD];
  const int q0 = blk * BQ;
  const int row = q0 + sg * 8 + fr;
  const int q_hi = metal::min(T_len, q0 + BQ) - 1;

  simdgroup_matrix<float, 8, 8> Qf[D / 8];
  simdgroup_matrix<float, 8, 8> Of[D / 8];
  for (int d = 0; d < D / 8; d++) {
    for (short e = 0; e < 2; e++)
      Qf[d].thread_elements()[e] = row < T_len ? float(q[base + (size_t)row * D + d * 8 + fc + e]) * sl2 : 0.0f;
    fa_zero(Of[d]);
  }
  float m = NEG, l = 0.0f;
  const int kb_lo = metal::max(0, q0 - W) / BK;
  const int kb_hi = q_hi / BK;
  for (int kb = kb_lo; kb <= kb_hi; kb++) {
    const int k0 = kb * BK;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = tid; i < BK * D; i += NT) {
      const int r = i / D, c = i % D;
      const bool inside = k0 + r < T_len;
      Ks[r * LD + c] = inside ? float(k[base + (size_t)k0 * D + i]) : 0.0f;
      Vs[r * LD + c] = inside ? float(v[base + (size_t)k0 * D + i]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    simdgroup_matrix<float, 8, 8> S[BK / 8];
    for (int j = 0; j < BK / 8; j++) {
      fa_zero(S[j]);
      for (int d = 0; d < D / 8; d++) {
        simdgroup_matrix<float, 8, 8> Kt;
        fa_load_t(Kt, Ks, LD, j * 8, d * 8, fr, fc);
        simdgroup_multiply_accumulate(S[j], Qf[d], Kt, S[j]);
      }
    }
    const bool full = k0 + BK - 1 <= q0 && q_hi - k0 <= W && k0 + BK <= T_len;
    if (!full) {
      for (int j = 0; j < BK / 8; j++)
        for (short e = 0; e < 2; e++) {
          const int col = k0 + j * 8 + fc + e;
          if (!(col <= row && row - col <= W && col < T_len)) S[j].thread_elements()[e] = NEG;
        }
    }
    float mnew = m;
    for (int j = 0; j < BK / 8; j++)
      mnew = metal::max(mnew, metal::max(S[j].thread_elements()[0], S[j].thread_elements()[1]));
    mnew = metal::max(mnew, simd_shuffle_xor(mnew, 1));
    mnew = metal::max(mnew, simd_shuffle_xor(mnew, 8));
    const float factor = fast::exp2(m - mnew);
    float rs = 0.0f;
    for (int j = 0; j < BK / 8; j++)
      for (short e = 0; e < 2; e++) {
        const float s = S[j].thread_elements()[e];
        const float p = s > NEG ? fast::exp2(s - mnew) : 0.0f;
        S[j].thread_elements()[e] = p;
        rs += p;
      }
    rs += simd_shuffle_xor(rs, 1);
    rs += simd_shuffle_xor(rs, 8);
    l = l * factor + rs;
    m = mnew;
    for (int d = 0; d < D / 8; d++) {
      Of[d].thread_elements()[0] *= factor;
      Of[d].thread_elements()[1] *= factor;
      for (int j = 0; j < BK / 8; j++) {
        simdgroup_matrix<float, 8, 8> Vf;
        fa_load(Vf, Vs, LD, j * 8, d * 8, fr, fc);
        simdgroup_multiply_accumulate(Of[d], S[j], Vf, Of[d]);
      }
    }
  }
  if (row < T_len) {
    const float inv = 1.0f / l;
    for (int d = 0; d < D / 8; d++)
      for (short e = 0; e < 2; e++)
        o[base + (size_t)row * D + d * 8 + fc + e] = T(Of[d].thread_elements()[e] * inv);
    if (fc == 0) lse[bh * T_len + row] = (m + metal::log2(l)) * 0.6931471805599453f;
  }
"""

DQ_SOURCE = _PRELUDE + """
  constexpr int NSG = 4;
  constexpr int BQ = 8 * NSG;
  constexpr int BK = D <= 64 ? 32 : 16;
  constexpr int NT = 32 * NSG;
  constexpr int LD = D + 4;  // padded rows: transposed fragment loads hit 32 distinct banks
  threadgroup float Ks[BK * LD];
  threadgroup float Vs[BK * LD];
  const int q0 = blk * BQ;
  const int row = q0 + sg * 8 + fr;
  const int q_hi = metal::min(T_len, q0 + BQ) - 1;
  const bool row_in = row < T_len;

  simdgroup_matrix<float, 8, 8> Qf[D / 8];
  simdgroup_matrix<float, 8, 8> dOf[D / 8];
  simdgroup_matrix<float, 8, 8> dQf[D / 8];
  for (int d = 0; d < D / 8; d++) {
    for (short e = 0; e < 2; e++) {
      const size_t at = base + (size_t)row * D + d * 8 + fc + e;
      Qf[d].thread_elements()[e] = row_in ? float(q[at]) * sl2 : 0.0f;
      dOf[d].thread_elements()[e] = row_in ? float(dout[at]) : 0.0f;
    }
    fa_zero(dQf[d]);
  }
  const float lse2 = row_in ? lse[bh * T_len + row] * 1.4426950408889634f : 0.0f;
  const float delta_r = row_in ? delta[bh * T_len + row] : 0.0f;
  const int kb_lo = metal::max(0, q0 - W) / BK;
  const int kb_hi = q_hi / BK;
  for (int kb = kb_lo; kb <= kb_hi; kb++) {
    const int k0 = kb * BK;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = tid; i < BK * D; i += NT) {
      const int r = i / D, c = i % D;
      const bool inside = k0 + r < T_len;
      Ks[r * LD + c] = inside ? float(k[base + (size_t)k0 * D + i]) : 0.0f;
      Vs[r * LD + c] = inside ? float(v[base + (size_t)k0 * D + i]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    simdgroup_matrix<float, 8, 8> S[BK / 8];
    simdgroup_matrix<float, 8, 8> dP[BK / 8];
    for (int j = 0; j < BK / 8; j++) {
      fa_zero(S[j]);
      fa_zero(dP[j]);
      for (int d = 0; d < D / 8; d++) {
        simdgroup_matrix<float, 8, 8> Xt;
        fa_load_t(Xt, Ks, LD, j * 8, d * 8, fr, fc);
        simdgroup_multiply_accumulate(S[j], Qf[d], Xt, S[j]);
        fa_load_t(Xt, Vs, LD, j * 8, d * 8, fr, fc);
        simdgroup_multiply_accumulate(dP[j], dOf[d], Xt, dP[j]);
      }
    }
    const bool full = k0 + BK - 1 <= q0 && q_hi - k0 <= W && k0 + BK <= T_len;
    for (int j = 0; j < BK / 8; j++)
      for (short e = 0; e < 2; e++) {
        const int col = k0 + j * 8 + fc + e;
        const bool ok = full || (col <= row && row - col <= W && col < T_len);
        const float p = ok ? fast::exp2(S[j].thread_elements()[e] - lse2) : 0.0f;
        S[j].thread_elements()[e] = p * (dP[j].thread_elements()[e] - delta_r);  // dS
      }
    for (int d = 0; d < D / 8; d++)
      for (int j = 0; j < BK / 8; j++) {
        simdgroup_matrix<float, 8, 8> Kf;
        fa_load(Kf, Ks, LD, j * 8, d * 8, fr, fc);
        simdgroup_multiply_accumulate(dQf[d], S[j], Kf, dQf[d]);
      }
  }
  if (row_in) {
    for (int d = 0; d < D / 8; d++)
      for (short e = 0; e < 2; e++)
        dq[base + (size_t)row * D + d * 8 + fc + e] = T(dQf[d].thread_elements()[e] * scale);
  }
"""

DKDV_SOURCE = _PRELUDE + """
  constexpr int NSG = D <= 64 ? 4 : 2;
  constexpr int BKV = 8 * NSG;           // keys per threadgroup
  constexpr int BQ = D <= 64 ? 32 : 16;  // queries per block
  constexpr int NT = 32 * NSG;
  constexpr int LD = D + 4;  // padded rows: transposed fragment loads hit 32 distinct banks
  threadgroup float Qs[BQ * LD];
  threadgroup float dOs[BQ * LD];
  threadgroup float L2s[BQ];
  threadgroup float Ds[BQ];
  const int k0 = blk * BKV;
  const int krow = k0 + sg * 8 + fr;
  const int k_hi = metal::min(T_len, k0 + BKV) - 1;
  const bool krow_in = krow < T_len;

  simdgroup_matrix<float, 8, 8> Kf[D / 8];
  simdgroup_matrix<float, 8, 8> Vf[D / 8];
  simdgroup_matrix<float, 8, 8> dKf[D / 8];
  simdgroup_matrix<float, 8, 8> dVf[D / 8];
  for (int d = 0; d < D / 8; d++) {
    for (short e = 0; e < 2; e++) {
      const size_t at = base + (size_t)krow * D + d * 8 + fc + e;
      Kf[d].thread_elements()[e] = krow_in ? float(k[at]) * sl2 : 0.0f;
      Vf[d].thread_elements()[e] = krow_in ? float(v[at]) : 0.0f;
    }
    fa_zero(dKf[d]);
    fa_zero(dVf[d]);
  }
  const int qb_lo = k0 / BQ;
  const int qb_hi = metal::min(T_len - 1, k_hi + W) / BQ;
  for (int qb = qb_lo; qb <= qb_hi; qb++) {
    const int q0 = qb * BQ;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = tid; i < BQ * D; i += NT) {
      const int r = i / D, c = i % D;
      const bool inside = q0 + r < T_len;
      Qs[r * LD + c] = inside ? float(q[base + (size_t)q0 * D + i]) : 0.0f;
      dOs[r * LD + c] = inside ? float(dout[base + (size_t)q0 * D + i]) : 0.0f;
    }
    for (int i = tid; i < BQ; i += NT) {
      const bool inside = q0 + i < T_len;
      L2s[i] = inside ? lse[bh * T_len + q0 + i] * 1.4426950408889634f : 0.0f;
      Ds[i] = inside ? delta[bh * T_len + q0 + i] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Transposed scores: rows are this simdgroup's 8 keys, columns the block's queries.
    simdgroup_matrix<float, 8, 8> St[BQ / 8];
    simdgroup_matrix<float, 8, 8> dPt[BQ / 8];
    for (int j = 0; j < BQ / 8; j++) {
      fa_zero(St[j]);
      fa_zero(dPt[j]);
      for (int d = 0; d < D / 8; d++) {
        simdgroup_matrix<float, 8, 8> Xt;
        fa_load_t(Xt, Qs, LD, j * 8, d * 8, fr, fc);
        simdgroup_multiply_accumulate(St[j], Kf[d], Xt, St[j]);
        fa_load_t(Xt, dOs, LD, j * 8, d * 8, fr, fc);
        simdgroup_multiply_accumulate(dPt[j], Vf[d], Xt, dPt[j]);
      }
    }
    const bool full = k0 + BKV - 1 <= q0 && q0 + BQ - 1 - k0 <= W && q0 + BQ <= T_len;
    for (int j = 0; j < BQ / 8; j++)
      for (short e = 0; e < 2; e++) {
        const int c = j * 8 + fc + e;
        const int col = q0 + c;
        const bool ok = full || (krow <= col && col - krow <= W && col < T_len);
        const float p = ok ? fast::exp2(St[j].thread_elements()[e] - L2s[c]) : 0.0f;
        St[j].thread_elements()[e] = p;
        dPt[j].thread_elements()[e] = p * (dPt[j].thread_elements()[e] - Ds[c]);  // dS^T
      }
    for (int d = 0; d < D / 8; d++)
      for (int j = 0; j < BQ / 8; j++) {
        simdgroup_matrix<float, 8, 8> X;
        fa_load(X, dOs, LD, j * 8, d * 8, fr, fc);
        simdgroup_multiply_accumulate(dVf[d], St[j], X, dVf[d]);
        fa_load(X, Qs, LD, j * 8, d * 8, fr, fc);
        simdgroup_multiply_accumulate(dKf[d], dPt[j], X, dKf[d]);
      }
  }
  if (krow_in) {
    for (int d = 0; d < D / 8; d++)
      for (short e = 0; e < 2; e++) {
        const size_t at = base + (size_t)krow * D + d * 8 + fc + e;
        dk[at] = T(dKf[d].thread_elements()[e] * scale);
        dv[at] = T(dVf[d].thread_elements()[e]);
      }
  }
"""

HEAD_DIMS = (64, 128)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class KernelCall:
    """Everything mx.fast.metal_kernel (or the emulator) needs for one launch."""

    name: str
    input_names: list[str]
    output_names: list[str]
    source: str
    header: str
    template: list[tuple[str, object]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[str]  # dtype names; "input" = the dtype of q
    inputs: list[str] = field(default_factory=list)  # what each input is, for documentation


def effective_window(window, T: int) -> int:
    """W the kernels receive: None or W >= T - 1 is plain causal (clamped to T)."""
    if window is None:
        return T
    if isinstance(window, bool) or int(window) != window or window < 0:
        raise ValueError(f"window must be None or a non-negative int (keys back from the query), got {window!r}")
    return min(int(window), T)


def check_shapes(shape, head_dims=HEAD_DIMS):
    if len(shape) != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got shape {tuple(shape)}")
    D = shape[3]
    if D not in head_dims:
        raise ValueError(f"head dim {D} has no Metal kernel: use one of {head_dims} (or the MLX fallback)")


def forward_call(shape, dtype: str) -> KernelCall:
    B, H, T, D = shape
    check_shapes(shape)
    nq = -(-T // 32)
    return KernelCall(
        name="fa_fwd", input_names=["q", "k", "v", "window", "scale"], output_names=["o", "lse"],
        source=FORWARD_SOURCE, header=HEADER, template=[("T", dtype), ("D", D)],
        grid=(nq * 128, H, B), threadgroup=(128, 1, 1),
        output_shapes=[(B, H, T, D), (B, H, T)], output_dtypes=[dtype, "float32"])


def dq_call(shape, dtype: str) -> KernelCall:
    B, H, T, D = shape
    check_shapes(shape)
    nq = -(-T // 32)
    return KernelCall(
        name="fa_bwd_dq", input_names=["q", "k", "v", "dout", "lse", "delta", "window", "scale"],
        output_names=["dq"], source=DQ_SOURCE, header=HEADER, template=[("T", dtype), ("D", D)],
        grid=(nq * 128, H, B), threadgroup=(128, 1, 1),
        output_shapes=[(B, H, T, D)], output_dtypes=[dtype])


def dkdv_call(shape, dtype: str) -> KernelCall:
    B, H, T, D = shape
    check_shapes(shape)
    nsg = 4 if D <= 64 else 2
    nk = -(-T // (8 * nsg))
    return KernelCall(
        name="fa_bwd_dkdv", input_names=["q", "k", "v", "dout", "lse", "delta", "window", "scale"],
        output_names=["dk", "dv"], source=DKDV_SOURCE, header=HEADER, template=[("T", dtype), ("D", D)],
        grid=(nk * 32 * nsg, H, B), threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(B, H, T, D), (B, H, T, D)], output_dtypes=[dtype, dtype])


def threadgroup_memory_bytes(call: KernelCall) -> int:
    """Threadgroup memory each kernel declares (float32 tiles), for the docs and the bench."""
    D = dict(call.template)["D"]
    if call.name == "fa_bwd_dkdv":
        bq = 32 if D <= 64 else 16
        return 4 * (2 * bq * (D + 4) + 2 * bq)
    bk = 32 if D <= 64 else 16
    return 4 * 2 * bk * (D + 4)
