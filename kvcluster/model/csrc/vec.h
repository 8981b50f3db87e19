// fp32 vector primitives over rows stored as float, bf16, fp16 or double, shared by the engine's kernels.
//
// AVX-512 where the build has it (the kernels are compiled with -march=native on the machine that
// runs them), else AVX2 + FMA, else plain loops; all accumulate in fp32. Every function takes a row length
// that need not be a multiple of the vector width (the tail is a masked load).
//
// Layout: each SIMD block defines its lane type (V16: 16 fp32 lanes in a __m512; V8: 8 lanes in a
// __m256) as a struct of thin wrappers over one intrinsic each, or over a short fixed helper such as
// scale2 (those that differ only in the _mm512 / _mm256 prefix come from KVC_LANE_OPS), plus the
// functions whose algorithm is width-specific (the reduction trees, dots16, dots4x16, max_of); `Vec`
// names the build's lane type. The functions whose sequence of fp32 operations is the same at both
// widths (exp, dot, sum_squares, axpy, exp_shifted, widen, weighted_rows_block) are written once
// below over `Vec`: a given build runs exactly the intrinsics, in the same order, that it ran when
// each width had its own copy.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace kvc {

// The lane-wise ops whose AVX-512 and AVX2 intrinsics differ only in their prefix (P: _mm512 or
// _mm256), each one intrinsic, expanded in V16 and in V8: fmadd(a, b, c) = a * b + c and
// fnmadd(a, b, c) = c - a * b, each rounded once.
#define KVC_LANE_OPS(P)                                                     \
  static Reg zero() { return P##_setzero_ps(); }                            \
  static Reg set1(float x) { return P##_set1_ps(x); }                       \
  static Reg add(Reg a, Reg b) { return P##_add_ps(a, b); }                 \
  static Reg sub(Reg a, Reg b) { return P##_sub_ps(a, b); }                 \
  static Reg mul(Reg a, Reg b) { return P##_mul_ps(a, b); }                 \
  static Reg min(Reg a, Reg b) { return P##_min_ps(a, b); }                 \
  static Reg max(Reg a, Reg b) { return P##_max_ps(a, b); }                 \
  static Reg fmadd(Reg a, Reg b, Reg c) { return P##_fmadd_ps(a, b, c); }   \
  static Reg fnmadd(Reg a, Reg b, Reg c) { return P##_fnmadd_ps(a, b, c); }

#if defined(__AVX512F__)

inline __mmask16 tail_mask(int64_t n) {  // the first min(n, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  // bf16 is the top half of an fp32: widen and shift, exact.
  const __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

inline __m512 load16(const c10::Half* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

inline __m512 load16(const double* p, __mmask16 mask) {  // rounded to fp32 as it is read
  const __m256 lo = _mm512_cvtpd_ps(_mm512_maskz_loadu_pd(static_cast<__mmask8>(mask), p));
  const __m256 hi = _mm512_cvtpd_ps(_mm512_maskz_loadu_pd(static_cast<__mmask8>(mask >> 8), p + 8));
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}

// Lane sums of 16 accumulators, each by one fixed tree: lanes (l, l+2), pairs of those, then
// 128-bit quarters (0+1), (2+3), then the two halves; lane i of the result is acc[i]'s sum, and
// its value depends on acc[i] alone (not on its slot or the other 15).
inline __m512 reduce16(const __m512* acc) {
  __m512 x[8], y[4], z[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // per 128-bit quarter: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]), _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // per quarter: one partial sum of each of 4 keys, in slot order
    const __m512d p = _mm512_castps_pd(x[2 * i]), q = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // quarters (0+1) and (2+3) of y[2i], then of y[2i+1]
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88), _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  // halves: quarter q of the result holds slots 4q..4q+3
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// 16 fp32 lanes: the AVX-512 side of the width-generic functions below. A Mask is a tail mask (the
// first min(n, 16) lanes); masked loads give 0 past it and masked stores leave memory there alone.
struct V16 {
  using Reg = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  // weighted_rows_block's rows per pass: 6 rows x 4 zmm accumulators + 4 values + 1 broadcast <= 32 zmm
  static constexpr int kRows = 6;

  static Mask mask(int64_t n) { return tail_mask(n); }
  template <typename T>
  static Reg load(const T* p, Mask m) { return load16(p, m); }
  static void store(float* p, Reg v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static Reg keep(Mask m, Reg v) { return _mm512_maskz_mov_ps(m, v); }  // lanes past the mask zeroed
  static Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Reg round(Reg x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static Reg scale(Reg p, Reg n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, rounded once
  static float sum(Reg v) { return _mm512_reduce_add_ps(v); }       // the lanes' sum, by GCC's fixed tree
  KVC_LANE_OPS(_mm512)
};
using Vec = V16;

// out[i] = sum_d a[d] * row(i)[d] for i < n <= 16: the attention scores of one query head against
// 16 keys. Each key's products are summed by one fixed tree (an fma chain over d in steps of 16
// lanes, then lanes (l, l+2), pairs of those, then 128-bit quarters (0+1), (2+3), then the two
// halves), whatever its slot and n: a key's score depends on the query and the key only. Reducing 16
// keys at once costs about a quarter of 16 separate horizontal sums.
template <typename T, typename RowAt>
inline void dots16(const float* a, int64_t n, const RowAt& row_at, int64_t dim, float* out) {
  __m512 acc[16];
  const T* rows[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    acc[i] = _mm512_setzero_ps();
    rows[i] = row_at(i < n ? i : 0);  // slots past n repeat row 0; their sums are not stored
  }
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 mask = tail_mask(dim - d);
    const __m512 av = _mm512_maskz_loadu_ps(mask, a + d);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(av, load16(rows[i] + d, mask), acc[i]);
  }
  _mm512_mask_storeu_ps(out, tail_mask(n), reduce16(acc));
}

// out_r[j] = a_r . (rows[j] + offset) for 4 query rows a_r and the keys j < n_r of a 16-key tile:
// the scores of several queries (or heads of one GQA group) against the same keys, 4 keys at a
// time, each key vector loaded once for the 4 rows. Slot 4r + i of the fixed tree of reduce16, so
// a score is bitwise the one dots16 gives for the same query and key. (Unrolling the d loop for a
// fixed head size measured 12-15% slower here: it stays rolled.)
inline void dots4x16(const float* const* a, const float* const* rows, int64_t offset, int64_t dim, float* const* out,
                     const int64_t* n) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  const __mmask16 m0 = tail_mask(n[0]), m1 = tail_mask(n[1]), m2 = tail_mask(n[2]), m3 = tail_mask(n[3]);
  const int64_t keys = std::max(std::max(n[0], n[1]), std::max(n[2], n[3]));
  for (int64_t g = 0; g < keys; g += 4) {
    const float *k0 = rows[g] + offset, *k1 = rows[g + 1] + offset, *k2 = rows[g + 2] + offset, *k3 = rows[g + 3] + offset;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 mask = tail_mask(dim - d);
      const __m512 q0 = _mm512_maskz_loadu_ps(mask, a0 + d), q1 = _mm512_maskz_loadu_ps(mask, a1 + d);
      const __m512 q2 = _mm512_maskz_loadu_ps(mask, a2 + d), q3 = _mm512_maskz_loadu_ps(mask, a3 + d);
      const __m512 v0 = _mm512_maskz_loadu_ps(mask, k0 + d), v1 = _mm512_maskz_loadu_ps(mask, k1 + d);
      const __m512 v2 = _mm512_maskz_loadu_ps(mask, k2 + d), v3 = _mm512_maskz_loadu_ps(mask, k3 + d);
      acc[0] = _mm512_fmadd_ps(q0, v0, acc[0]); acc[1] = _mm512_fmadd_ps(q0, v1, acc[1]);
      acc[2] = _mm512_fmadd_ps(q0, v2, acc[2]); acc[3] = _mm512_fmadd_ps(q0, v3, acc[3]);
      acc[4] = _mm512_fmadd_ps(q1, v0, acc[4]); acc[5] = _mm512_fmadd_ps(q1, v1, acc[5]);
      acc[6] = _mm512_fmadd_ps(q1, v2, acc[6]); acc[7] = _mm512_fmadd_ps(q1, v3, acc[7]);
      acc[8] = _mm512_fmadd_ps(q2, v0, acc[8]); acc[9] = _mm512_fmadd_ps(q2, v1, acc[9]);
      acc[10] = _mm512_fmadd_ps(q2, v2, acc[10]); acc[11] = _mm512_fmadd_ps(q2, v3, acc[11]);
      acc[12] = _mm512_fmadd_ps(q3, v0, acc[12]); acc[13] = _mm512_fmadd_ps(q3, v1, acc[13]);
      acc[14] = _mm512_fmadd_ps(q3, v2, acc[14]); acc[15] = _mm512_fmadd_ps(q3, v3, acc[15]);
    }
    const __m512 sums = reduce16(acc);
    const int shift = static_cast<int>(g);
    _mm_mask_storeu_ps(out[0] + g, static_cast<__mmask8>((m0 >> shift) & 0xf), _mm512_extractf32x4_ps(sums, 0));
    _mm_mask_storeu_ps(out[1] + g, static_cast<__mmask8>((m1 >> shift) & 0xf), _mm512_extractf32x4_ps(sums, 1));
    _mm_mask_storeu_ps(out[2] + g, static_cast<__mmask8>((m2 >> shift) & 0xf), _mm512_extractf32x4_ps(sums, 2));
    _mm_mask_storeu_ps(out[3] + g, static_cast<__mmask8>((m3 >> shift) & 0xf), _mm512_extractf32x4_ps(sums, 3));
  }
}

// max of s[0..n), n >= 1 (order-free: max is exact, so the same as a scalar walk for non-NaN values).
inline float max_of(const float* s, int64_t n) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, tail_mask(n - j), s + j));
  return _mm512_reduce_max_ps(top);
}

#elif defined(__AVX2__) && defined(__FMA__)  // AVX2 + FMA (e.g. AMD Zen 2/3, Intel before AVX-512)

// 8 lanes per vector. Every function keeps the contract of the AVX-512 path: a value that depends on
// one query and one key (a score), or on one row (a norm), is computed by one fixed sequence of fp32
// operations whatever its neighbours: an fma chain over d in steps of 8 lanes (a short tail is
// zero-padded), then the fixed tree hsum8 of the 8 lanes. (The sums differ from the AVX-512 path's
// 16-lane trees, which is why kernel_isa() names this build "avx2".)

inline int64_t lanes8(int64_t n) { return n >= 8 ? 8 : n < 0 ? 0 : n; }

inline __m256i mask8(int64_t n) {  // the first clamp(n, 0, 8) lanes of a maskload / maskstore
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes8(n))), idx);
}

// Lanes [0, n) of p widened to fp32 (exact for bf16 and fp16, rounded for double); lanes past n are 0.
inline __m256 load8(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask8(n));
}

inline __m256 widen8(__m128i half) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16)); }

template <typename T>
inline __m128i load_halves(const T* p, int64_t n) {  // 8 16-bit values, zero past n
  if (n >= 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  alignas(16) uint16_t buf[8] = {0};
  std::memcpy(buf, p, lanes8(n) * sizeof(uint16_t));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}

inline __m256 load8(const c10::BFloat16* p, int64_t n) { return widen8(load_halves(p, n)); }
inline __m256 load8(const c10::Half* p, int64_t n) { return _mm256_cvtph_ps(load_halves(p, n)); }

inline __m256 load8(const double* p, int64_t n) {  // rounded to fp32 as it is read
  if (n >= 8) return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(p + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(p)));
  alignas(32) double buf[8] = {0.0};
  std::memcpy(buf, p, lanes8(n) * sizeof(double));
  return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_load_pd(buf + 4)), _mm256_cvtpd_ps(_mm256_load_pd(buf)));
}

inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, mask8(n), v);
}

// The fixed tree of one vector's 8 lanes: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
inline float hsum8(__m256 v) {
  const __m128 h = _mm_hadd_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 01 23 45 67
  const __m128 q = _mm_hadd_ps(h, h);                                                     // 0123 4567
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// Lane i of the result is hsum8(acc[i]), by the same tree (hadd pairs, then the two 128-bit halves).
inline __m256 reduce8(const __m256* acc) {
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [a0..a3 low sums | a0..a3 high sums]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// p * 2^n for integer-valued n in [-150, 128], rounded once, as AVX-512's scalef: the first factor
// keeps p * 2^(n/2) a normal float (exact), the second rounds once (to a denormal or 0 if need be).
inline __m256 scale2(__m256 p, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1), rest = _mm256_sub_epi32(ni, half);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}

// 8 fp32 lanes: the AVX2 side of the width-generic functions below. A Mask is the count of lanes
// left (clamped to [0, 8] where used): loads give 0 past it and stores leave memory there alone.
struct V8 {
  using Reg = __m256;
  using Mask = int64_t;
  static constexpr int kLanes = 8;
  // weighted_rows_block's rows per pass: 2 rows x 4 ymm accumulators + 4 values + 1 broadcast <= 16 ymm
  static constexpr int kRows = 2;

  static Mask mask(int64_t n) { return n; }
  template <typename T>
  static Reg load(const T* p, Mask n) { return load8(p, n); }
  static void store(float* p, Reg v, Mask n) { store8(p, v, n); }
  static Reg keep(Mask n, Reg v) { return _mm256_and_ps(_mm256_castsi256_ps(mask8(n)), v); }  // lanes past n zeroed
  static Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Reg round(Reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static Reg scale(Reg p, Reg n) { return scale2(p, n); }  // p * 2^n, rounded once (as scalef)
  static float sum(Reg v) { return hsum8(v); }
  KVC_LANE_OPS(_mm256)
};
using Vec = V8;

// out[i] = sum_d a[d] * row(i)[d] for i < n <= 16, 8 keys at a time: each key's score is its fma
// chain then hsum8 (reduce8), whatever its slot and n.
template <typename T, typename RowAt>
inline void dots16(const float* a, int64_t n, const RowAt& row_at, int64_t dim, float* out) {
  for (int64_t g = 0; g < n; g += 8) {
    __m256 acc[8];
    const T* rows[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      acc[i] = _mm256_setzero_ps();
      rows[i] = row_at(g + i < n ? g + i : g);  // slots past n repeat a real row; their sums are not stored
    }
    for (int64_t d = 0; d < dim; d += 8) {
      const __m256 av = load8(a + d, dim - d);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(av, load8(rows[i] + d, dim - d), acc[i]);
    }
    store8(out + g, reduce8(acc), n - g);
  }
}

// out_r[j] = a_r . (rows[j] + offset) for 4 query rows a_r and the keys j < n_r of a 16-key tile,
// 4 rows x 2 keys per pass (each key vector loaded once for the 4 rows): bitwise dots16's scores.
inline void dots4x16(const float* const* a, const float* const* rows, int64_t offset, int64_t dim, float* const* out,
                     const int64_t* n) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  const int64_t keys = std::max(std::max(n[0], n[1]), std::max(n[2], n[3]));
  for (int64_t g = 0; g < keys; g += 2) {
    const float* k0 = rows[g] + offset;
    const float* k1 = rows[g + 1 < keys ? g + 1 : g] + offset;
    __m256 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += 8) {
      const int64_t left = dim - d;
      const __m256 v0 = load8(k0 + d, left), v1 = load8(k1 + d, left);
      const __m256 q0 = load8(a0 + d, left), q1 = load8(a1 + d, left);
      acc[0] = _mm256_fmadd_ps(q0, v0, acc[0]); acc[1] = _mm256_fmadd_ps(q0, v1, acc[1]);
      acc[2] = _mm256_fmadd_ps(q1, v0, acc[2]); acc[3] = _mm256_fmadd_ps(q1, v1, acc[3]);
      const __m256 q2 = load8(a2 + d, left), q3 = load8(a3 + d, left);
      acc[4] = _mm256_fmadd_ps(q2, v0, acc[4]); acc[5] = _mm256_fmadd_ps(q2, v1, acc[5]);
      acc[6] = _mm256_fmadd_ps(q3, v0, acc[6]); acc[7] = _mm256_fmadd_ps(q3, v1, acc[7]);
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, reduce8(acc));
    for (int r = 0; r < 4; ++r)
      for (int64_t i = 0; i < 2 && g + i < n[r]; ++i) out[r][g + i] = sums[2 * r + i];
  }
}

// max of s[0..n), n >= 1 (order-free: max is exact).
inline float max_of(const float* s, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  __m256 topv = _mm256_set1_ps(top);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) topv = _mm256_max_ps(topv, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, topv);
  for (float v : lanes) top = std::max(top, v);
  for (; j < n; ++j) top = std::max(top, s[j]);
  return top;
}

#endif

#undef KVC_LANE_OPS

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))

// The width-generic functions: one sequence of fp32 operations, run over Vec's lanes (16 or 8).

// exp of one vector's lanes (Cephes' expf polynomial, within 2 ulp of std::exp); -inf and very negative
// inputs give 0, as softmax needs.
template <typename V>
inline typename V::Reg exp_lanes(typename V::Reg x) {
  x = V::max(x, V::set1(-104.0f));  // below this exp underflows to 0 anyway
  x = V::min(x, V::set1(88.37f));
  const typename V::Reg n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  typename V::Reg r = V::fnmadd(n, V::set1(0.693359375f), x);
  r = V::fnmadd(n, V::set1(-2.12194440e-4f), r);
  typename V::Reg p = V::set1(1.9875691500e-4f);
  p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
  p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
  p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
  p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
  p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
  p = V::fmadd(V::mul(p, r), r, V::add(r, V::set1(1.0f)));
  return V::scale(p, n);
}

// sum_d a[d] * b[d], a in fp32: one fma chain over d in steps of the width, then Vec::sum.
template <typename T>
inline float dot(const float* a, const T* b, int64_t dim) {
  using V = Vec;
  typename V::Reg acc = V::zero();
  for (int64_t d = 0; d < dim; d += V::kLanes) {
    const typename V::Mask mask = V::mask(dim - d);
    acc = V::fmadd(V::load(a + d, mask), V::load(b + d, mask), acc);
  }
  return V::sum(acc);
}

// sum_d a[d]^2, by the same chain and sum as dot.
template <typename T>
inline float sum_squares(const T* a, int64_t dim) {
  using V = Vec;
  typename V::Reg acc = V::zero();
  for (int64_t d = 0; d < dim; d += V::kLanes) {
    const typename V::Reg v = V::load(a + d, V::mask(dim - d));
    acc = V::fmadd(v, v, acc);
  }
  return V::sum(acc);
}

// acc[d] += p * b[d], one fma per element.
template <typename T>
inline void axpy(float p, const T* b, float* acc, int64_t dim) {
  using V = Vec;
  const typename V::Reg pv = V::set1(p);
  for (int64_t d = 0; d < dim; d += V::kLanes) {
    const typename V::Mask mask = V::mask(dim - d);
    V::store(acc + d, V::fmadd(pv, V::load(b + d, mask), V::load(acc + d, mask)), mask);
  }
}

// s[j] = exp(s[j] - top) (exp_lanes); returns the sum (the lane sums in order of j, then Vec::sum).
inline float exp_shifted(float* s, int64_t n, float top) {
  using V = Vec;
  const typename V::Reg topv = V::set1(top);
  typename V::Reg sum = V::zero();
  for (int64_t j = 0; j < n; j += V::kLanes) {
    const typename V::Mask mask = V::mask(n - j);
    const typename V::Reg e = V::keep(mask, exp_lanes<V>(V::sub(V::load(s + j, mask), topv)));
    V::store(s + j, e, mask);
    sum = V::add(sum, e);
  }
  return V::sum(sum);
}

// out[i] = float(row[i]) for i < n: exact for bf16 and fp16 (a tile widened once, read by many queries).
template <typename T>
inline void widen(const T* row, float* out, int64_t n) {
  using V = Vec;
  for (int64_t i = 0; i < n; i += V::kLanes) {
    const typename V::Mask mask = V::mask(n - i);
    V::store(out + i, V::load(row + i, mask), mask);
  }
}

// R rows at once over one slice of Vs vectors (Vs x Vec::kLanes dims): for each row r,
// acc[r][d] += sum_j p[r][j] * row(j)[d] for j < count, in order: each value vector is loaded once for
// the R rows. Per element the same fma chain as axpy(p[r][j], row(j), acc[r], dim) for j = 0, 1, ...,
// with acc held in registers.
template <int R, int Vs>
inline void weighted_block_slice(const float* const* p, float* const* acc, int64_t count, const float* const* rows,
                                 int64_t voffset, int64_t offset, int64_t width) {
  using V = Vec;
  constexpr int W = V::kLanes;
  // Fully unrolled so that the R x Vs accumulators live in registers (GCC keeps a partly indexed
  // array of vectors on the stack and stores it every iteration: 3x slower).
  typename V::Reg a[R][Vs];
  typename V::Mask masks[Vs];
#pragma GCC unroll 4
  for (int v = 0; v < Vs; ++v) masks[v] = V::mask(width - W * v);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < Vs; ++v) a[r][v] = V::load(acc[r] + offset + W * v, masks[v]);
  const float* pr[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) pr[r] = p[r];
  for (int64_t j = 0; j < count; ++j) {
    const float* row = rows[j] + voffset + offset;
    typename V::Reg values[Vs];
#pragma GCC unroll 4
    for (int v = 0; v < Vs; ++v) values[v] = V::load(row + W * v, masks[v]);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const typename V::Reg pv = V::broadcast(pr[r] + j);
#pragma GCC unroll 4
      for (int v = 0; v < Vs; ++v) a[r][v] = V::fmadd(pv, values[v], a[r][v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < Vs; ++v) V::store(acc[r] + offset + W * v, a[r][v], masks[v]);
}

template <int R>
inline void weighted_block(const float* const* p, float* const* acc, int64_t count, const float* const* rows,
                           int64_t voffset, int64_t dim) {
  constexpr int W = Vec::kLanes;
  for (int64_t offset = 0; offset < dim; offset += 4 * W) {  // slices of 4 vectors: R x 4 accumulators in registers
    const int64_t width = std::min<int64_t>(4 * W, dim - offset);
    switch ((width + W - 1) / W) {
      case 1: weighted_block_slice<R, 1>(p, acc, count, rows, voffset, offset, width); break;
      case 2: weighted_block_slice<R, 2>(p, acc, count, rows, voffset, offset, width); break;
      case 3: weighted_block_slice<R, 3>(p, acc, count, rows, voffset, offset, width); break;
      default: weighted_block_slice<R, 4>(p, acc, count, rows, voffset, offset, width); break;
    }
  }
}

// For every row r < n_rows: acc[r][d] += sum_{j < ends[r]} p[r][j] * (rows[j] + voffset)[d], j in order
// (d < dim): value vectors shared by up to Vec::kRows rows per load (6 with AVX-512, 2 with AVX2); a
// row's tail past the shortest row of its group continues the same chain alone.
inline void weighted_rows_block(const float* const* p, float* const* acc, const int64_t* ends, int64_t n_rows,
                                const float* const* rows, int64_t voffset, int64_t dim) {
  constexpr int K = Vec::kRows;
  constexpr int64_t kRows = K;
  for (int64_t r0 = 0; r0 < n_rows; r0 += kRows) {
    const int64_t n = std::min(kRows, n_rows - r0);
    const int64_t common = *std::min_element(ends + r0, ends + r0 + n);
    switch (n) {  // n <= K: with AVX2 (K = 2) the cases past 2 are never taken (capped at K, not instantiated)
      case 1: weighted_block<1>(p + r0, acc + r0, common, rows, voffset, dim); break;
      case 2: weighted_block<std::min(2, K)>(p + r0, acc + r0, common, rows, voffset, dim); break;
      case 3: weighted_block<std::min(3, K)>(p + r0, acc + r0, common, rows, voffset, dim); break;
      case 4: weighted_block<std::min(4, K)>(p + r0, acc + r0, common, rows, voffset, dim); break;
      case 5: weighted_block<std::min(5, K)>(p + r0, acc + r0, common, rows, voffset, dim); break;
      default: weighted_block<K>(p + r0, acc + r0, common, rows, voffset, dim); break;
    }
    for (int64_t r = r0; r < r0 + n; ++r)
      if (ends[r] > common) {
        const float* pr = p[r] + common;
        float* ar = acc[r];
        weighted_block<1>(&pr, &ar, ends[r] - common, rows + common, voffset, dim);
      }
  }
}

#else  // plain loops
template <typename T>
inline float dot(const float* a, const T* b, int64_t dim) {
  float acc = 0.f;
  for (int64_t d = 0; d < dim; ++d) acc += a[d] * static_cast<float>(b[d]);
  return acc;
}

template <typename T>
inline float sum_squares(const T* a, int64_t dim) {
  float acc = 0.f;
  for (int64_t d = 0; d < dim; ++d) acc += static_cast<float>(a[d]) * static_cast<float>(a[d]);
  return acc;
}

template <typename T>
inline void axpy(float p, const T* b, float* acc, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) acc[d] += p * static_cast<float>(b[d]);
}

template <typename T, typename RowAt>
inline void dots16(const float* a, int64_t n, const RowAt& row_at, int64_t dim, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = dot(a, row_at(i), dim);
}

inline void dots4x16(const float* const* a, const float* const* rows, int64_t offset, int64_t dim, float* const* out,
                     const int64_t* n) {
  for (int r = 0; r < 4; ++r)
    for (int64_t j = 0; j < n[r]; ++j) out[r][j] = dot(a[r], rows[j] + offset, dim);
}

inline float max_of(const float* s, int64_t n) { return *std::max_element(s, s + n); }

inline float exp_shifted(float* s, int64_t n, float top) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    sum += s[j];
  }
  return sum;
}

template <typename T>
inline void widen(const T* row, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(row[i]);
}

inline void weighted_rows_block(const float* const* p, float* const* acc, const int64_t* ends, int64_t n_rows,
                                const float* const* rows, int64_t voffset, int64_t dim) {
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t j = 0; j < ends[r]; ++j) axpy(p[r][j], rows[j] + voffset, acc[r], dim);
}


#endif

}  // namespace kvc
