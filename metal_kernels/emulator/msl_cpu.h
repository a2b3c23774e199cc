// msl_cpu.h: enough of the Metal Shading Language to run mx.fast.metal_kernel bodies on a CPU.
//
// Execution model. Threadgroups run one at a time per worker (OS) thread. Each GPU thread of a
// group is a fiber with its own stack; it runs until it reaches a synchronisation point
// (threadgroup_barrier, a simd_* collective, simdgroup_multiply_accumulate) and then yields to
// the group's scheduler. The last participant to arrive releases the others. A group in which
// no fiber can run while some have not finished is a deadlock (divergent barrier or collective)
// and is reported as an error, as are exceeded Metal limits (threadgroup memory).
//
// This header is what a kernel is compiled against: types and the MSL surface. The scheduler
// lives in msl_runtime.cpp, compiled once; a kernel library reaches it through the `Api` table
// that mslemu_launch receives, so each kernel compiles in a fraction of a second.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>


// ------------------------------------------------------------------------------------------
// Scalar types: half and bfloat as storage types that round to nearest even when stored.
namespace mslcpu {
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t float_to_half_bits(float f) {
  uint32_t x = f2u(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to infinity
  if (ax < 0x38800000u) {                                    // half subnormal or zero
    // 0.5f has an ulp of 2^-24, the half subnormal step: float addition does the rounding.
    float t = u2f(ax) + 0.5f;
    return (uint16_t)(sign | (f2u(t) - 0x3f000000u));
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent by -112, round half to even
  return (uint16_t)(sign | (ax >> 13));
}
inline float half_bits_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return u2f(sign) + (sign ? -1.0f : 1.0f) * (float)m * 5.9604644775390625e-08f;
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t float_to_bfloat_bits(float f) {
  uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}
inline float bfloat_bits_to_float(uint16_t b) { return u2f((uint32_t)b << 16); }

template <int KIND>  // 0 = half, 1 = bfloat
struct small_float {
  uint16_t bits;
  small_float() = default;
  template <class A, class = std::enable_if_t<std::is_arithmetic<A>::value>>
  small_float(A a) { set((float)a); }
  template <int K2> explicit small_float(small_float<K2> o) { set((float)o); }
  void set(float f) { bits = KIND == 0 ? float_to_half_bits(f) : float_to_bfloat_bits(f); }
  operator float() const { return KIND == 0 ? half_bits_to_float(bits) : bfloat_bits_to_float(bits); }
  small_float& operator+=(float o) { set((float)*this + o); return *this; }
  small_float& operator-=(float o) { set((float)*this - o); return *this; }
  small_float& operator*=(float o) { set((float)*this * o); return *this; }
  small_float& operator/=(float o) { set((float)*this / o); return *this; }
  small_float operator-() const { small_float r; r.bits = bits ^ 0x8000u; return r; }
};
// half op half stays half (rounded), as in MSL; mixed with float it is float.
#define MSLCPU_SF_OP(op)                                                                     \
  template <int K> inline small_float<K> operator op(small_float<K> a, small_float<K> b) { \
    return small_float<K>((float)a op (float)b); }
MSLCPU_SF_OP(+) MSLCPU_SF_OP(-) MSLCPU_SF_OP(*) MSLCPU_SF_OP(/)
#undef MSLCPU_SF_OP
}  // namespace mslcpu
typedef mslcpu::small_float<0> half;
typedef mslcpu::small_float<1> bfloat;
typedef half float16_t;
typedef bfloat bfloat16_t;
typedef bfloat bfloat16;

// ------------------------------------------------------------------------------------------
// Vector types (clang ext_vector_type: .x/.xy swizzles and elementwise arithmetic, like MSL).
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
#define MSLCPU_VEC(T, name)                                  \
  typedef T name##2 __attribute__((ext_vector_type(2)));     \
  typedef T name##3 __attribute__((ext_vector_type(3)));     \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MSLCPU_VEC(float, float) MSLCPU_VEC(int, int) MSLCPU_VEC(uint, uint) MSLCPU_VEC(short, short)
MSLCPU_VEC(ushort, ushort) MSLCPU_VEC(char, char) MSLCPU_VEC(uchar, uchar) MSLCPU_VEC(long, long)
MSLCPU_VEC(ulong, ulong)
#undef MSLCPU_VEC

namespace mslcpu {
template <class V> using elem_t = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V&>()[0])>>;
template <class V, class A> inline V mk(A a) { V v = (elem_t<V>)a; return v; }
template <class V, class A0, class A1, class... A> inline V mk(A0 a0, A1 a1, A... a) {
  V v = {static_cast<elem_t<V>>(a0), static_cast<elem_t<V>>(a1), static_cast<elem_t<V>>(a)...};
  return v;
}
}  // namespace mslcpu
// MSL constructor syntax: float2(a, b), uint3(x, y, z), float4(0) (splat)
#define float2(...) mslcpu::mk<float2>(__VA_ARGS__)
#define float3(...) mslcpu::mk<float3>(__VA_ARGS__)
#define float4(...) mslcpu::mk<float4>(__VA_ARGS__)
#define int2(...) mslcpu::mk<int2>(__VA_ARGS__)
#define int3(...) mslcpu::mk<int3>(__VA_ARGS__)
#define int4(...) mslcpu::mk<int4>(__VA_ARGS__)
#define uint2(...) mslcpu::mk<uint2>(__VA_ARGS__)
#define uint3(...) mslcpu::mk<uint3>(__VA_ARGS__)
#define uint4(...) mslcpu::mk<uint4>(__VA_ARGS__)
#define short2(...) mslcpu::mk<short2>(__VA_ARGS__)
#define ushort2(...) mslcpu::mk<ushort2>(__VA_ARGS__)
#define ulong2(...) mslcpu::mk<ulong2>(__VA_ARGS__)

// ------------------------------------------------------------------------------------------
// Fibers, groups, scheduler.

// ------------------------------------------------------------------------------------------
// What kernels and the runtime share.
namespace mslcpu {
constexpr int kSlotIn = 32, kSlotOut = 16;

struct Attrs {
  uint3 thread_position_in_grid, threads_per_grid, thread_position_in_threadgroup,
      threads_per_threadgroup, threadgroup_position_in_grid, threadgroups_per_grid, grid_size,
      grid_origin, dispatch_threads_per_threadgroup;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup,
      simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width,
      quadgroup_index_in_threadgroup, thread_index_in_quadgroup, quadgroups_per_threadgroup,
      dispatch_simdgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};

struct SimdGroup;
typedef void (*SimdOp)(SimdGroup&);
struct SimdGroup {
  int size = 0, arrived = 0, done = 0;
  uint32_t active = 0;  // lanes waiting at the current collective
  SimdOp op = nullptr;
  bool mismatch = false;
  alignas(16) unsigned char in[32][kSlotIn];
  alignas(16) unsigned char out[32][kSlotOut];
};

typedef void (*Body)(void* ctx, const Attrs& a);

struct Launch {  // filled by the Python side (ctypes), layout mirrored there
  uint32_t grid[3], threadgroup[3];
  int32_t schedule;  // 0 forward, 1 reverse, >= 2: shuffled with this seed
  int32_t workers;
  int64_t tg_mem_limit;
  int32_t max_threads;
  int32_t _pad;
  char error[1024];
};

struct Api {  // the runtime's entry points (msl_runtime.cpp)
  void (*barrier)();
  void (*simd_arrive)(SimdOp op);
  SimdGroup* (*cur_sg)();
  int (*cur_lane)();
  void* (*tg_alloc)(size_t size, size_t align);
  void (*fail)(const char* message);
  int (*launch)(Launch* L, Body body, void* ctx);
};
static inline const Api*& api() { static const Api* a = nullptr; return a; }  // one per library
inline int cur_lane() { return api()->cur_lane(); }
inline SimdGroup& cur_sg() { return *api()->cur_sg(); }
template <class T> inline T* tg_alloc() { return (T*)api()->tg_alloc(sizeof(T), alignof(T)); }
}  // namespace mslcpu

#ifndef MSLCPU_RUNTIME
// ------------------------------------------------------------------------------------------
// The MSL surface.
#define device
#define constant
#define thread
#define threadgroup
#define kernel
#define METAL_FUNC inline
#define INFINITY_F std::numeric_limits<float>::infinity()
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return (mem_flags)((int)a | (int)b); }
inline void threadgroup_barrier(mem_flags) { mslcpu::api()->barrier(); }

namespace mslcpu {
template <class T> struct Payload { T v; ushort arg; };
template <class T> inline T& in_val(SimdGroup& g, int l) { return ((Payload<T>*)g.in[l])->v; }
template <class T> inline ushort in_arg(SimdGroup& g, int l) { return ((Payload<T>*)g.in[l])->arg; }
template <class T> inline T& out_val(SimdGroup& g, int l) { return *(T*)g.out[l]; }

enum SimdKind { SHUFFLE, SHUFFLE_XOR, SHUFFLE_DOWN, SHUFFLE_UP, SUM, MAX, MIN, PREFIX_EXCL, PREFIX_INCL, NOP };
template <class T, int K> void simd_op(SimdGroup& g) {
  static_assert(sizeof(Payload<T>) <= kSlotIn && sizeof(T) <= kSlotOut, "simd operand too large");
  if (K == NOP) return;
  if (K == SUM || K == MAX || K == MIN) {
    bool first = true; T acc{};
    for (int l = 0; l < g.size; l++) if (g.active >> l & 1u) {
      T x = in_val<T>(g, l);
      if (first) { acc = x; first = false; }
      else if (K == SUM) acc = acc + x;
      else if (K == MAX) acc = acc < x ? x : acc;
      else acc = x < acc ? x : acc;
    }
    for (int l = 0; l < g.size; l++) out_val<T>(g, l) = acc;
    return;
  }
  if (K == PREFIX_EXCL || K == PREFIX_INCL) {
    T acc{}; acc = 0;
    for (int l = 0; l < g.size; l++) if (g.active >> l & 1u) {
      T x = in_val<T>(g, l);
      if (K == PREFIX_INCL) acc = acc + x;
      out_val<T>(g, l) = acc;
      if (K == PREFIX_EXCL) acc = acc + x;
    }
    return;
  }
  for (int l = 0; l < g.size; l++) if (g.active >> l & 1u) {
    int a = in_arg<T>(g, l), src;
    if (K == SHUFFLE) src = a;
    else if (K == SHUFFLE_XOR) src = l ^ a;
    else if (K == SHUFFLE_DOWN) src = l + a;
    else src = l - a;
    if (src < 0 || src >= g.size || !(g.active >> src & 1u)) src = l;  // undefined in MSL: own value
    out_val<T>(g, l) = in_val<T>(g, src);
  }
}
template <int K, class T> inline T simd_collective(T v, ushort arg = 0) {
  SimdGroup& g = cur_sg();
  int lane = cur_lane();
  Payload<T>* p = (Payload<T>*)g.in[lane];
  p->v = v; p->arg = arg;
  api()->simd_arrive(&simd_op<T, K>);
  return *(T*)cur_sg().out[lane];
}
}  // namespace mslcpu

template <class T> inline T simd_shuffle(T v, ushort lane) { return mslcpu::simd_collective<mslcpu::SHUFFLE>(v, lane); }
template <class T> inline T simd_broadcast(T v, ushort lane) { return mslcpu::simd_collective<mslcpu::SHUFFLE>(v, lane); }
template <class T> inline T simd_shuffle_xor(T v, ushort mask) { return mslcpu::simd_collective<mslcpu::SHUFFLE_XOR>(v, mask); }
template <class T> inline T simd_shuffle_down(T v, ushort d) { return mslcpu::simd_collective<mslcpu::SHUFFLE_DOWN>(v, d); }
template <class T> inline T simd_shuffle_up(T v, ushort d) { return mslcpu::simd_collective<mslcpu::SHUFFLE_UP>(v, d); }
template <class T> inline T simd_sum(T v) { return mslcpu::simd_collective<mslcpu::SUM>(v); }
template <class T> inline T simd_max(T v) { return mslcpu::simd_collective<mslcpu::MAX>(v); }
template <class T> inline T simd_min(T v) { return mslcpu::simd_collective<mslcpu::MIN>(v); }
template <class T> inline T simd_prefix_exclusive_sum(T v) { return mslcpu::simd_collective<mslcpu::PREFIX_EXCL>(v); }
template <class T> inline T simd_prefix_inclusive_sum(T v) { return mslcpu::simd_collective<mslcpu::PREFIX_INCL>(v); }
inline void simdgroup_barrier(mem_flags) { mslcpu::simd_collective<mslcpu::NOP>(0); }

namespace metal {
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
inline float abs(float x) { return std::fabs(x); }
inline int abs(int x) { return x < 0 ? -x : x; }
inline float fabs(float x) { return std::fabs(x); }
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float log2(float x) { return std::log2(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float pow(float x, float y) { return std::pow(x, y); }
inline float floor(float x) { return std::floor(x); }
inline float ceil(float x) { return std::ceil(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T> using numeric_limits = std::numeric_limits<T>;
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float log2(float x) { return std::log2(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
}  // namespace precise
template <class T, int N> struct vec_of { typedef T type __attribute__((ext_vector_type(N))); };
template <class T, int N> using vec = typename vec_of<T, N>::type;

// Two elements of an 8x8 fragment held by one lane: an ext vector for float, a pair otherwise.
template <class T> struct pair2 {
  T e[2];
  pair2() = default;
  pair2(T a) { e[0] = a; e[1] = a; }
  T& operator[](int i) { return e[i]; }
  const T& operator[](int i) const { return e[i]; }
  pair2& operator*=(float s) { e[0] = (T)((float)e[0] * s); e[1] = (T)((float)e[1] * s); return *this; }
};
template <class T> struct frag_elems { typedef pair2<T> type; };
template <> struct frag_elems<float> { typedef float2 type; };

// simdgroup_matrix<T, 8, 8>. Lane l holds elements (r, c) and (r, c + 1) with
// r = (q & 4) + (l / 2) % 4, c = (q & 2) * 2 + (l % 2) * 2, q = l / 4: the layout MLX's steel
// kernels rely on (mlx/backend/metal/kernels/steel/attn/mma.h).
template <class T, int R, int C> struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "the emulator implements 8x8 simdgroup matrices");
  typename frag_elems<T>::type e;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diag) { e = (T)0; int r, c; coord(mslcpu::cur_lane(), r, c); if (r == c) e[0] = diag; if (r == c + 1) e[1] = diag; }
  typename frag_elems<T>::type& thread_elements() { return e; }
  const typename frag_elems<T>::type& thread_elements() const { return e; }
  static void coord(int lane, int& r, int& c) {
    int q = lane / 4;
    r = (q & 4) + (lane / 2) % 4;
    c = (q & 2) * 2 + (lane % 2) * 2;
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
template <class T, int C, int R> inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  m.e = value;
  return m;
}

template <class T, class U>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, const U* src, ulong elements_per_row = 8,
                           ulong2 origin = ulong2(0), bool transpose = false) {
  int r, c;
  simdgroup_matrix<T, 8, 8>::coord(mslcpu::cur_lane(), r, c);
  for (int k = 0; k < 2; k++) {
    ulong row = r, col = c + k;
    if (transpose) { ulong t_ = row; row = col; col = t_; };  // origin addresses the source; the block is transposed
    m.e[k] = (T)(float)src[(origin.y + row) * elements_per_row + origin.x + col];
  }
}
template <class T, class U>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, U* dst, ulong elements_per_row = 8,
                            ulong2 origin = ulong2(0), bool transpose = false) {
  int r, c;
  simdgroup_matrix<T, 8, 8>::coord(mslcpu::cur_lane(), r, c);
  for (int k = 0; k < 2; k++) {
    ulong row = r, col = c + k;
    if (transpose) { ulong t_ = row; row = col; col = t_; };
    dst[(origin.y + row) * elements_per_row + origin.x + col] = (U)(float)m.e[k];
  }
}
}  // namespace metal

namespace mslcpu {
struct MmaIn { float a[2], b[2], c[2]; };
inline void mma_op(SimdGroup& g) {
  if (g.active != 0xffffffffu) {
    char msg[128];
    snprintf(msg, sizeof(msg), "simdgroup_multiply_accumulate needs all 32 lanes of the simdgroup (%d active)",
             __builtin_popcount(g.active));
    api()->fail(msg);
    return;
  }
  float A[8][8], B[8][8], C[8][8];
  for (int l = 0; l < 32; l++) {
    int r, c;
    metal::simdgroup_matrix<float, 8, 8>::coord(l, r, c);
    const MmaIn* p = (const MmaIn*)g.in[l];
    for (int k = 0; k < 2; k++) { A[r][c + k] = p->a[k]; B[r][c + k] = p->b[k]; C[r][c + k] = p->c[k]; }
  }
  for (int l = 0; l < 32; l++) {
    int r, c;
    metal::simdgroup_matrix<float, 8, 8>::coord(l, r, c);
    float* o = (float*)g.out[l];
    for (int k = 0; k < 2; k++) {
      float acc = C[r][c + k];
      for (int i = 0; i < 8; i++) acc = std::fma(A[r][i], B[i][c + k], acc);
      o[k] = acc;
    }
  }
}
}  // namespace mslcpu

namespace metal {
template <class T, class A, class B, class C>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<A, 8, 8>& a,
                                          const simdgroup_matrix<B, 8, 8>& b, const simdgroup_matrix<C, 8, 8>& c) {
  using namespace mslcpu;
  int lane = cur_lane();
  MmaIn* p = (MmaIn*)cur_sg().in[lane];
  for (int k = 0; k < 2; k++) { p->a[k] = (float)a.e[k]; p->b[k] = (float)b.e[k]; p->c[k] = (float)c.e[k]; }
  api()->simd_arrive(&mma_op);
  const float* o = (const float*)cur_sg().out[lane];
  d.e[0] = (T)o[0];
  d.e[1] = (T)o[1];
}
template <class T, class A, class B>
inline void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<A, 8, 8>& a,
                               const simdgroup_matrix<B, 8, 8>& b) {
  simdgroup_matrix<T, 8, 8> z;
  z.e = (T)0;
  simdgroup_multiply_accumulate(d, a, b, z);
}
}  // namespace metal
using namespace metal;
#endif  // MSLCPU_RUNTIME
