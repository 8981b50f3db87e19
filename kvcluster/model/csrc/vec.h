// fp32 vector primitives over rows stored as float, bf16, fp16 or double, shared by the engine's kernels.
//
// AVX-512 where the build has it (the kernels are compiled with -march=native on the machine that
// runs them), plain loops otherwise; both accumulate in fp32. Every function takes a row length
// that need not be a multiple of 16 (the tail is a masked load).

#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace kvc {

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

// exp of 16 lanes (Cephes' expf polynomial, within 2 ulp of std::exp); -inf and very negative
// inputs give 0, as softmax needs.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // below this exp underflows to 0 anyway
  x = _mm512_min_ps(x, _mm512_set1_ps(88.37f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// sum_d a[d] * b[d], a in fp32.
template <typename T>
inline float dot(const float* a, const T* b, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 mask = tail_mask(dim - d);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + d), load16(b + d, mask), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// sum_d a[d]^2
template <typename T>
inline float sum_squares(const T* a, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __m512 v = load16(a + d, tail_mask(dim - d));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// acc[d] += p * b[d]
template <typename T>
inline void axpy(float p, const T* b, float* acc, int64_t dim) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 mask = tail_mask(dim - d);
    _mm512_mask_storeu_ps(acc + d, mask, _mm512_fmadd_ps(pv, load16(b + d, mask), _mm512_maskz_loadu_ps(mask, acc + d)));
  }
}

// s[j] = exp(s[j] - top); returns the sum.
inline float exp_shifted(float* s, int64_t n, float top) {
  const __m512 topv = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + j), topv)));
    _mm512_mask_storeu_ps(s + j, mask, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
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

inline float exp_shifted(float* s, int64_t n, float top) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    sum += s[j];
  }
  return sum;
}

#endif

}  // namespace kvc
