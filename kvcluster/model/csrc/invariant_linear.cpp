// y = x @ w.T whose every output element is computed the same way whatever the row count M, the
// row's place in the batch, the tiling or the thread count: the batch-invariant matmul of the
// engine's deterministic mode.
//
// THE INVARIANCE CONTRACT (what fixes each output element y[m, n], by construction):
//
//   float32:  acc = 0; for k = 0 .. K-1 in order: acc = fma(x[m, k], w[n, k], acc); y = acc.
//             One fp32 fused multiply-add chain per element (one zmm lane of _mm512_fmadd_ps with
//             x[m, k] broadcast); no reassociation, no split of K, no horizontal reduce.
//   bfloat16: the same fp32 FMA chain on the (exactly) widened bf16 values, with k taken in the
//             order vdpbf16ps takes it: pairs in order, the odd element of each pair first:
//                 acc = 0; for p = 0 .. ceil(K/2)-1:
//                     acc = fma(x[m, 2p+1], w[n, 2p+1], acc); acc = fma(x[m, 2p], w[n, 2p], acc)
//             (K odd: x[m, K] = w[n, K] = 0); y = bf16(acc), rounded once, to nearest even exactly
//             as static_cast<c10::BFloat16> does (NaN -> 0x7fc0).
//             With AVX512_BF16 this is one lane of _mm512_dpbf16_ps per k pair: the instruction is
//             defined (Intel SDM) as exactly those two fused steps, odd first, each rounded to
//             nearest even, except that it treats denormal inputs and results as zero; on this
//             Zen 4 its fp32 accumulators equal the scalar std::fma chain above bit for bit
//             (tests/test_invariant_linear.py checks it). Without AVX512_BF16 the file runs that
//             chain with _mm512_fmadd_ps over a weight packed in the same k order, so a bf16 result
//             is the same on either kind of CPU unless denormals occur.
//             Why the pair instruction rather than one fp32 FMA per k on widened values: one
//             instruction per 2 k and no widening of the weights. Measured with the same tiles
//             (2-core Zen 4): 2.0-2.3x faster at 16-1024 rows, 1.3-1.5x at one row with the
//             weights in cache; at one row from DRAM (lm_head) both wait on memory and tie.
//
// What is free to vary, because none of it touches that per-element order: which rows share a
// register tile (MR) and which columns (the panels of NR = 32 below), the order tiles and panels
// are visited, M blocks, prefetching, and the split of the N panels across threads
// (at::parallel_for; the extension is built with -fopenmp). K is never split across threads or
// across accumulators.
//
// Layout: invariant_pack re-lays a torch Linear weight w [N, K] out once at load time into panels
// of NR = 32 output columns, the tail panel zero-padded:
//   float32:                     [ceil(N/32)][K][32]             (a k step reads 128 contiguous bytes)
//   bfloat16 with AVX512_BF16:   [ceil(N/32)][ceil(K/2)][32][2]  (a k-pair step reads 128 bytes)
//   bfloat16 without:            [ceil(N/32)][2*ceil(K/2)][32], k in the order 1, 0, 3, 2, ...
// so each panel is one sequential stream, and a thread's range of panels is one as well.
//
// Kernels: one register tile, up to 14 rows x one panel (2 zmm of 16 columns = 28 accumulators;
// per k two weight loads, one x broadcast per row). Every row count uses it:
//  - 1..3 rows (decode of one sequence, a warm request's last forward) is a read of the weights.
//    One panel at a time is one sequential stream per thread, which the hardware prefetcher
//    follows best: measured on lm_head (113 MB fp32 / 57 MB bf16, from DRAM) interleaving two
//    panels (4 zmm of chains) was 0-20% slower and software prefetch 30-60% slower; two chains
//    (of 16 lanes) per row already outrun the rate memory delivers.
//  - 4..16 rows (batched decode): one M block, so still one pass over the weights from memory:
//    every row tile runs on a panel while it is in L1/L2.
//  - more rows (prefill): the same tile over M blocks sized to keep the x block in L2.
// Measured against today's Linear (few_rows_linear / oneDNN): bench/invariant_linear.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NR = 32;  // output columns per panel
#if defined(__AVX512F__) && defined(__AVX512BF16__)
constexpr bool kBf16Pairs = true;
#else
constexpr bool kBf16Pairs = false;
#endif

int64_t panels_of(int64_t N) { return (N + NR - 1) / NR; }

// [rows, 2k] -> each column pair swapped: (a0, a1, b0, b1, ...) -> (a1, a0, b1, b0, ...)
at::Tensor swap_pairs(const at::Tensor& t) { return t.view({t.size(0), t.size(1) / 2, 2}).flip({2}).reshape({t.size(0), t.size(1)}); }

// ---- packing --------------------------------------------------------------------------------

at::Tensor invariant_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "invariant_pack: w must be [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "invariant_pack takes float32 or bfloat16");
  const int64_t N = w.size(0), K = w.size(1), P = panels_of(N);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const int64_t Kpad = bf16 ? (K + 1) / 2 * 2 : K;
  at::Tensor padded = at::zeros({P * NR, Kpad}, w.options().device(at::kCPU));
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  if (bf16 && kBf16Pairs) return padded.view({P, NR, Kpad / 2, 2}).permute({0, 2, 1, 3}).contiguous();
  if (bf16) padded = swap_pairs(padded);  // the chain walks k as vdpbf16ps does: 1, 0, 3, 2, ...
  return padded.view({P, NR, Kpad}).permute({0, 2, 1}).contiguous();
}

// ---- kernels ----------------------------------------------------------------------------------

#if defined(__AVX512F__)

inline __mmask16 lanes(int64_t n) {  // the first clamp(n, 0, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512 load_w16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_w16(const c10::BFloat16* p) {  // bf16 is the top half of an fp32: exact
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline void store16(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 mask) {
  // Round to nearest even as c10's static_cast does: (bits + 0x7fff + lsb) >> 16, NaN -> 0x7fc0.
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(r));
}

// MR rows of x (fp32, row stride ldx) times NV/2 adjacent panels (panel stride `ps` elements):
// out[MR][NV*16] (row stride ldo), the first `ncols` columns of which are real.
template <int MR, int NV, typename W, typename OT>
inline void tile_chain(const float* x, int64_t ldx, const W* b, int64_t ps, int64_t K, OT* out, int64_t ldo, int64_t ncols) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) {
      const W* p = b + (v >> 1) * ps + k * NR + (v & 1) * 16;
      bv[v] = load_w16(p);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(x[i * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(a, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) store16(out + i * ldo + v * 16, acc[i][v], lanes(ncols - v * 16));
}

#if defined(__AVX512BF16__)
// The pair form: x bf16 (row stride ldx), b packed [Kp][32][2].
template <int MR, int NV, typename OT>
inline void tile_pairs(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* b, int64_t ps, int64_t K, OT* out, int64_t ldo,
                       int64_t ncols) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t full = K / 2;
  for (int64_t kp = 0; kp < full; ++kp) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) {
      const c10::BFloat16* p = b + (v >> 1) * ps + kp * 2 * NR + (v & 1) * 32;
      bv[v] = (__m512bh)_mm512_loadu_si512(p);
    }
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * kp, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, bv[v]);
    }
  }
  if (K & 1) {  // the last pair is (x[K-1], 0): the packed weights are zero-padded already
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + (v >> 1) * ps + full * 2 * NR + (v & 1) * 32);
    for (int i = 0; i < MR; ++i) {
      uint16_t last;
      std::memcpy(&last, x + i * ldx + K - 1, 2);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(last));
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, bv[v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) store16(out + i * ldo + v * 16, acc[i][v], lanes(ncols - v * 16));
}
#endif

#elif defined(__AVX2__) && defined(__FMA__)  // AVX2 + FMA: the same chains, 8 columns per ymm

inline __m256 load_w8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_w8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32: exact
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
  } else if (n > 0) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(p, mask, v);
  }
}
inline void store8(c10::BFloat16* p, __m256 v, int64_t n) {
  if (n <= 0) return;
  // Round to nearest even as c10's static_cast does: (bits + 0x7fff + lsb) >> 16, NaN -> 0x7fc0.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // packus works per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]; qwords 0 and 2 are r0..r7.
  const __m128i packed = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  } else {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), packed);
    std::memcpy(p, buf, n * sizeof(uint16_t));
  }
}

// MR rows of x (fp32, row stride ldx) times one panel, 16 columns at a time (MR x 2 ymm accumulators,
// two weight vectors and one broadcast: at most 15 of the 16 registers): out[MR][32].
template <int MR, int NV, typename W, typename OT>
inline void tile_chain(const float* x, int64_t ldx, const W* b, int64_t ps, int64_t K, OT* out, int64_t ldo, int64_t ncols) {
  static_assert(NV == 2, "one panel of 32 columns");
  for (int64_t c0 = 0; c0 < std::min<int64_t>(ncols, NR); c0 += 16) {
    __m256 acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const W* bp = b + c0;
    for (int64_t k = 0; k < K; ++k) {
      const __m256 w0 = load_w8(bp + k * NR), w1 = load_w8(bp + k * NR + 8);
      for (int i = 0; i < MR; ++i) {
        const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
        acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      store8(out + i * ldo + c0, acc[i][0], ncols - c0);
      store8(out + i * ldo + c0 + 8, acc[i][1], ncols - c0 - 8);
    }
  }
}

#else  // portable: the same chains, one element at a time

template <int MR, int NV, typename W, typename OT>
inline void tile_chain(const float* x, int64_t ldx, const W* b, int64_t ps, int64_t K, OT* out, int64_t ldo, int64_t ncols) {
  for (int i = 0; i < MR; ++i)
    for (int64_t c = 0; c < std::min<int64_t>(ncols, NV * 16); ++c) {
      const W* col = b + (c / NR) * ps + c % NR;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(x[i * ldx + k], static_cast<float>(col[k * NR]), acc);
      out[i * ldo + c] = static_cast<OT>(acc);
    }
}

#endif

// One tile of `rows` (1..kMaxRows) rows over NV/2 panels: the runtime row count to a template.
#if defined(__AVX512F__)
constexpr int kMaxRows = 14;  // 14 rows x 2 zmm = 28 accumulators
#else
constexpr int kMaxRows = 6;   // AVX2: 6 rows x 2 ymm = 12 accumulators of the 16 registers
#endif

template <int NV, typename XT, typename W, typename OT>
struct Tile {
  static void run(int rows, const XT* x, int64_t ldx, const W* b, int64_t ps, int64_t K, OT* out, int64_t ldo, int64_t ncols) {
    switch (rows) {
#define KVC_TILE_CASE(R) \
  case R:                \
    return call<(R * NV <= 28 && R <= kMaxRows ? R : 1)>(x, ldx, b, ps, K, out, ldo, ncols);
      KVC_TILE_CASE(1) KVC_TILE_CASE(2) KVC_TILE_CASE(3) KVC_TILE_CASE(4) KVC_TILE_CASE(5) KVC_TILE_CASE(6) KVC_TILE_CASE(7)
      KVC_TILE_CASE(8) KVC_TILE_CASE(9) KVC_TILE_CASE(10) KVC_TILE_CASE(11) KVC_TILE_CASE(12) KVC_TILE_CASE(13) KVC_TILE_CASE(14)
#undef KVC_TILE_CASE
      default: TORCH_CHECK(false, "invariant_linear: bad tile height ", rows);
    }
  }
  template <int MR>
  static void call(const XT* x, int64_t ldx, const W* b, int64_t ps, int64_t K, OT* out, int64_t ldo, int64_t ncols) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if constexpr (std::is_same_v<XT, c10::BFloat16>) {
      tile_pairs<MR, NV>(x, ldx, b, ps, K, out, ldo, ncols);
      return;
    } else
#endif
    {
      if constexpr (std::is_same_v<XT, float>) tile_chain<MR, NV>(x, ldx, b, ps, K, out, ldo, ncols);
    }
  }
};

// The driver: threads split the N panels; each thread walks its panels once per M block and runs
// every row tile of the block on a panel while that panel is in L1/L2. At 16 rows or fewer there
// is one block, so the weights are read from memory once whatever M.
template <typename XT, typename W, typename OT>
void run(const XT* x, int64_t M, const W* packed, int64_t N, int64_t K, OT* out) {
  const int64_t P = panels_of(N);
  const int64_t ps = (kBf16Pairs && std::is_same_v<XT, c10::BFloat16> ? (K + 1) / 2 * 2 : K) * NR;  // panel stride
  // M block: x rows that stay in L2 (~384 KB) while the thread's panels stream past.
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(XT));
  const int64_t block = M <= 16 ? M : std::max<int64_t>(kMaxRows * 2, (384 << 10) / row_bytes / kMaxRows * kMaxRows);
  // Panels per task: ~4 MB of weight reads, or the same time in FMAs, before waking the other
  // thread pays (the few-rows op's rule).
  const int64_t cost = ps * static_cast<int64_t>(sizeof(W)) + M * K * NR * 2;
  const int64_t grain = std::max<int64_t>(1, (4 << 20) / cost);
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      const int64_t mb = std::min(block, M - m0);
      const int64_t tiles = (mb + kMaxRows - 1) / kMaxRows, height = (mb + tiles - 1) / tiles;
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t r = 0; r < mb; r += height)
          Tile<2, XT, W, OT>::run(static_cast<int>(std::min(height, mb - r)), x + (m0 + r) * K, K, packed + p * ps, ps, K,
                                  out + (m0 + r) * N + p * NR, N, N - p * NR);
    }
  });
}

// x [M, K] (float32 or bfloat16) @ w.T with w packed by invariant_pack -> [M, N] in x's dtype.
at::Tensor invariant_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "invariant_linear: x must be [M, K]");
  TORCH_CHECK(x_in.scalar_type() == packed.scalar_type(), "invariant_linear: x and the packed weight must share a dtype");
  TORCH_CHECK(x_in.device().is_cpu() && packed.device().is_cpu() && packed.is_contiguous(), "invariant_linear: CPU tensors");
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const int64_t Kpad = bf16 ? (K + 1) / 2 * 2 : K;
  TORCH_CHECK(packed.numel() == panels_of(N) * NR * Kpad, "invariant_linear: packed weight does not match N, K");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  if (x.scalar_type() == at::kFloat) {
    run<float, float, float>(x.data_ptr<float>(), M, packed.data_ptr<float>(), N, K, out.data_ptr<float>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "invariant_linear takes float32 or bfloat16");
    using B = c10::BFloat16;
    if constexpr (kBf16Pairs) {
      run<B, B, B>(x.data_ptr<B>(), M, packed.data_ptr<B>(), N, K, out.data_ptr<B>());
    } else {
      // Widened (exact), zero-padded to even K, in the packed weight's k order.
      at::Tensor xf = at::zeros({M, Kpad}, x.options().dtype(at::kFloat));
      xf.narrow(1, 0, K).copy_(x);
      xf = swap_pairs(xf).contiguous();
      run<float, B, B>(xf.data_ptr<float>(), M, packed.data_ptr<B>(), N, Kpad, out.data_ptr<B>());
    }
  }
  return out;
}

// The contract written as plainly as possible, for the tests: one scalar std::fma chain per element
// (float32 weights w [N, K], not packed). Slow; small shapes only.
at::Tensor invariant_linear_reference(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat, "reference: float32 only");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(xp[m * K + k], wp[n * K + k], acc);
      op[m * N + n] = acc;
    }
  return out;
}

bool invariant_bf16_pairs() { return kBf16Pairs; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvcluster, m) {
  m.def("invariant_pack(Tensor w) -> Tensor");
  m.def("invariant_linear(Tensor x, Tensor packed, int N, int K) -> Tensor");
  m.def("invariant_linear_reference(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcluster, CPU, m) {
  m.impl("invariant_pack", &invariant_pack);
  m.impl("invariant_linear", &invariant_linear);
  m.impl("invariant_linear_reference", &invariant_linear_reference);
}
