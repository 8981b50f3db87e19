// y = x @ w.T for the few rows of a decode step or a warm request's last forward.
//
// At 1-8 rows a matmul is a read of the weights, nothing more: memory-bound. MKL's gemv reaches
// about 11 GB/s on the 2-core CPUs we run on (and does not run faster on 2 threads), oneDNN 12;
// a plain streaming dot product reaches the ~30 GB/s one core can read. Each weight row is read
// from memory once; x rows (converted to fp32 once) stay in L1. fp32 accumulation for both
// dtypes; a bf16 result is rounded once.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kXRows = 4;                // x rows per pass over a weight row (it stays in L1)
constexpr int64_t kPrefetchBytes = 1024;  // how far ahead of its reads the stream asks for lines

#if defined(__AVX512F__)

inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  // bf16 is the top half of an fp32: widen and shift, exact.
  const __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// MR x rows (fp32, stride K) dot one weight row: y[MR]. The weights are read as one sequential
// stream (one row after the other), which is what lets one core reach its memory bandwidth.
template <typename T, int MR>
inline void row_dots(const float* x, const T* w, int64_t K, float* y) {
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (K - k)) - 1);
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchBytes, _MM_HINT_T0);
    const __m512 wv = load16(w + k, mask);
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + i * K + k), wv, acc[i]);
  }
  for (int i = 0; i < MR; ++i) y[i] = _mm512_reduce_add_ps(acc[i]);
}

#elif defined(__AVX2__) && defined(__FMA__)  // 8 lanes, the tail one element at a time

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

template <typename T, int MR>
inline void row_dots(const float* x, const T* w, int64_t K, float* y) {
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchBytes, _MM_HINT_T0);
    const __m256 wv = load8(w + k);
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * K + k), wv, acc[i]);
  }
  for (int i = 0; i < MR; ++i) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[i]);
    float dot = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (int64_t t = k; t < K; ++t) dot += x[i * K + t] * static_cast<float>(w[t]);
    y[i] = dot;
  }
}

#else  // portable fallback, same order of work

template <typename T, int MR>
inline void row_dots(const float* x, const T* w, int64_t K, float* y) {
  for (int i = 0; i < MR; ++i) {
    float dot = 0.f;
    for (int64_t k = 0; k < K; ++k) dot += x[i * K + k] * static_cast<float>(w[k]);
    y[i] = dot;
  }
}

#endif

template <typename T>
inline void row_dots(const float* x, int64_t rows, const T* w, int64_t K, float* y) {
  switch (rows) {
    case 1: return row_dots<T, 1>(x, w, K, y);
    case 2: return row_dots<T, 2>(x, w, K, y);
    case 3: return row_dots<T, 3>(x, w, K, y);
    default: return row_dots<T, 4>(x, w, K, y);
  }
}

template <typename T>
void few_rows(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* x_all = xf.data_ptr<float>();
  const T* w_all = w.data_ptr<T>();
  T* out_all = out.data_ptr<T>();
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(T));
  // Rows per task: ~4 MB of weights per x row (a task wakes the other thread only when that pays).
  const int64_t grain = std::max<int64_t>(1, (4 << 20) / (row_bytes * M));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    float y[kXRows];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kXRows) {
        const int64_t mr = std::min(kXRows, M - m0);
        row_dots<T>(x_all + m0 * K, mr, w_all + n * K, K, y);
        for (int64_t i = 0; i < mr; ++i) out_all[(m0 + i) * N + n] = static_cast<T>(y[i]);
      }
    }
  });
}

// x [M, K], w [N, K] (both contiguous, fp32 or bf16, one dtype) -> x @ w.T [M, N] in that dtype.
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x must be [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w must share a dtype");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    few_rows<float>(x, w, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "few_rows_linear takes float32 or bfloat16");
    few_rows<c10::BFloat16>(x, w, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvcluster, m) { m.def("few_rows_linear(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(kvcluster, CPU, m) { m.impl("few_rows_linear", &few_rows_linear); }
