// Attention of query tokens over their sequences' keys, read in place from the paged KV pool.
//
// The pool is [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]; a sequence's keys
// are scattered over its blocks, so torch needs a gather into padded copies per layer. Here each
// query token walks its block table directly: no copies, no padding, no mask. A key row holds every
// kv head, so a block is read front to back once, and the query heads of one GQA group share the
// row they read. fp32 accumulation (AVX-512 dot, axpy and exp, see vec.h) for every input dtype;
// the output is rounded once to the input dtype.
//
// Sliding-window layers (window > 0) see only their last `window` keys: query t attends keys
// max(0, position_t - window + 1) .. position_t. Chunks wholly before that are skipped; in the chunk
// the window starts in, the keys before it get probability exactly 0 (never exp of a large negative).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t kTile = 16;        // keys per score tile: one kvc::dots16 / dots4x16 call
constexpr int64_t kValueTile = 128;  // values per tile of the weighted sum (fewer accumulator loads and stores)
constexpr int64_t kQueryBlock = 16;  // query tokens of one sequence that share every key/value load

// The first key a query at `pos` sees: 0 without a window.
inline int64_t window_start(int64_t pos, int64_t window) { return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; }

// One work item: a block of query tokens t0 .. t0 + nq - 1, consecutive tokens of one sequence,
// and chunk c of their keys. Query t's part of the chunk is keys [c * chunk, min(context_t, (c + 1) * chunk));
// queries whose context ends before the chunk take no part. Every query of the block reads each
// key (then value) tile once for all its heads and all the block's queries: the tile is widened to
// fp32 once (bf16 and fp16 pools) into a scratch buffer in L1, and values are accumulated into
// several (query, head) rows per load.
//
// The arithmetic of each query is fixed by its own keys alone, exactly as if it were alone in
// the batch, whatever block, batch or tile it shares:
//  - score of key j: kvc::dots16's fixed tree over q . k_j (widening to fp32 is exact);
//  - softmax numerators over its chunk: its own max, kvc::exp_shifted over its own count;
//  - output: acc[d] = fma chain over its keys j in ascending order (kvc::weighted_rows_block).
// So a query's output bits do not depend on which other queries share its block or tile.
// Writes each query head's running max and exp-sum and its unnormalised output (fp32) to
// parts[item of (t, c)]: [heads, dim + 2] = acc[dim], max, sum.
template <typename T>
struct Attend {
  const T* pool;
  const T* q_all;
  const int32_t* table_all;
  int64_t width, num_heads, num_kv, group, dim, block_size, block_stride, kv_stride, row_stride;
  float scale;

  const T* key_row(const int32_t* table, int64_t j) const {  // [num_kv, dim]
    return pool + table[j / block_size] * block_stride + (j % block_size) * row_stride;
  }

  struct Scratch {  // one per thread, reused across items
    std::vector<float> qf, scores, tile;
    std::vector<const float*> rows, p_rows;
    std::vector<float*> acc_rows;
    std::vector<int64_t> ends;
  };

  // Rows of keys (half = 0) or values (half = 1) j0 .. j0 + n - 1 as fp32 [num_kv * dim] pointers,
  // `size` of them; the slots past n repeat the first row (dots16 reads but never stores them).
  void tile_rows(const int32_t* table, int64_t j0, int64_t n, int half, int64_t size, Scratch& s) const {
    const int64_t row_len = num_kv * dim;
    s.rows.resize(size);
    for (int64_t i = 0; i < size; ++i) {
      const T* row = key_row(table, j0 + (i < n ? i : 0)) + half * kv_stride;
      if constexpr (std::is_same_v<T, float>) {
        s.rows[i] = row;
      } else {
        float* out = s.tile.data() + i * row_len;
        if (i < n) kvc::widen(row, out, row_len);
        s.rows[i] = i < n ? out : s.tile.data();
      }
    }
  }

  // The rows (query q, head) that read kv head `kvh` and have keys in [j0, j0 + tile): each row's
  // input in(q, head), output out(q, head) and its number of keys in the tile. Returns the count.
  template <typename In, typename Out>
  int64_t rows_of(int64_t kvh, int64_t nq, const int64_t* count, int64_t j0, int64_t tile, In in, Out out,
                  Scratch& s) const {
    int64_t n = 0;
    for (int64_t q = 0; q < nq; ++q)
      for (int64_t head = kvh * group; count[q] > j0 && head < (kvh + 1) * group; ++head) {
        s.p_rows[n] = in(q, head);
        s.acc_rows[n] = out(q, head);
        s.ends[n++] = std::min(tile, count[q] - j0);
      }
    return n;
  }

  void run(int64_t t0, int64_t nq, int32_t seq, const int32_t* pos_all, int64_t c, int64_t chunk, int64_t window,
           float* const* parts, Scratch& s) const {
    const int32_t* table = table_all + static_cast<int64_t>(seq) * width;
    const int64_t first = c * chunk, hd = num_heads * dim;
    int64_t count[kQueryBlock];   // keys of each query in this chunk, from `first` (0: takes no part)
    int64_t masked[kQueryBlock];  // of which the leading ones before its window (probability 0)
    int64_t longest = 0;
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t pos = pos_all[t0 + q];
      count[q] = parts[q] == nullptr ? 0 : std::max<int64_t>(0, std::min<int64_t>(pos + 1, first + chunk) - first);
      masked[q] = std::clamp<int64_t>(window_start(pos, window) - first, 0, count[q]);
      longest = std::max(longest, count[q]);
    }
    s.qf.resize(nq * hd);
    for (int64_t i = 0; i < nq * hd; ++i) s.qf[i] = static_cast<float>(q_all[t0 * hd + i]) * scale;
    s.scores.resize(nq * num_heads * longest);  // [query, head, key]
    s.tile.resize(kValueTile * num_kv * dim);
    s.p_rows.resize(nq * group);
    s.acc_rows.resize(nq * group);
    s.ends.resize(nq * group);
    for (int64_t j0 = 0; j0 < longest; j0 += kTile) {  // scores, 16 keys at a time
      tile_rows(table, first + j0, std::min(kTile, longest - j0), 0, kTile, s);
      for (int64_t kvh = 0; kvh < num_kv; ++kvh) {  // the rows (query, head) reading this kv head
        const int64_t offset = kvh * dim;
        const int64_t n_rows = rows_of(
            kvh, nq, count, j0, kTile, [&](int64_t q, int64_t head) { return s.qf.data() + q * hd + head * dim; },
            [&](int64_t q, int64_t head) { return s.scores.data() + (q * num_heads + head) * longest + j0; }, s);
        int64_t r = 0;
        for (; r + 4 <= n_rows; r += 4)  // 4 rows x 4 keys: each key vector loaded once for 4 rows
          kvc::dots4x16(s.p_rows.data() + r, s.rows.data(), offset, dim, s.acc_rows.data() + r, s.ends.data() + r);
        for (; r < n_rows; ++r)  // the rest one row at a time (decode: the heads of one group)
          kvc::dots16<float>(s.p_rows[r], s.ends[r], [&](int64_t i) { return s.rows[i] + offset; }, dim, s.acc_rows[r]);
      }
    }
    for (int64_t q = 0; q < nq; ++q) {  // softmax numerators, fp32
      for (int64_t head = 0; count[q] > 0 && head < num_heads; ++head) {
        float* sc = s.scores.data() + (q * num_heads + head) * longest;
        float* out = parts[q] + head * (dim + 2);
        const float top = kvc::max_of(sc + masked[q], count[q] - masked[q]);
        std::fill(out, out + dim, 0.f);
        std::fill(sc, sc + masked[q], 0.f);  // keys before the window: weight exactly 0
        out[dim] = top;
        out[dim + 1] = kvc::exp_shifted(sc + masked[q], count[q] - masked[q], top);
      }
    }
    // out += sum_j p_j v_j, keys in order: the rows of one kv head (every query of the block, every
    // head of its group) take each value tile together.
    for (int64_t j0 = 0; j0 < longest; j0 += kValueTile) {
      tile_rows(table, first + j0, std::min(kValueTile, longest - j0), 1, kValueTile, s);
      for (int64_t kvh = 0; kvh < num_kv; ++kvh) {
        const int64_t n_rows = rows_of(
            kvh, nq, count, j0, kValueTile,
            [&](int64_t q, int64_t head) -> const float* { return s.scores.data() + (q * num_heads + head) * longest + j0; },
            [&](int64_t q, int64_t head) { return parts[q] + head * (dim + 2); }, s);
        kvc::weighted_rows_block(s.p_rows.data(), s.acc_rows.data(), s.ends.data(), n_rows, s.rows.data(), kvh * dim, dim);
      }
    }
  }
};

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& kv, int64_t layer, const at::Tensor& tables,
            const at::Tensor& seq_of, const at::Tensor& positions, double scale, int64_t chunk_keys, int64_t window,
            at::Tensor& out) {
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = kv.size(3), num_kv = kv.size(4), group = num_heads / num_kv;
  const Attend<T> work{kv.data_ptr<T>() + layer * kv.stride(1), q.data_ptr<T>(), tables.data_ptr<int32_t>(),
                       tables.size(1), num_heads, num_kv, group, dim, block_size, kv.stride(0), kv.stride(2),
                       kv.stride(3), static_cast<float>(scale)};
  const int32_t* seq_all = seq_of.data_ptr<int32_t>();
  const int32_t* pos_all = positions.data_ptr<int32_t>();
  // Chunks of a query's keys. Two ways to cut them:
  // - adaptive (chunk_keys == 0): a small batch has fewer tokens than threads, so long contexts
  //   are split into chunks of whole blocks, each its own item, merged below (as flash-decoding
  //   does on GPUs); short ones stay whole (a chunk under kMinChunkKeys keys costs less than
  //   waking another thread). The split depends on the batch: fastest, not batch-invariant.
  // - fixed (chunk_keys > 0, the deterministic mode): every query's keys are cut at multiples of
  //   chunk_keys whatever else is in the batch, and merged in order. A query's output then
  //   depends only on its own keys: bitwise the same in any batch, chunked prefill or decode.
  constexpr int64_t kMinChunkKeys = 256;
  int64_t chunk = chunk_keys;
  if (chunk <= 0) {
    const int64_t threads = at::get_num_threads();
    int64_t longest = 1;
    for (int64_t t = 0; t < num_tokens; ++t) longest = std::max<int64_t>(longest, pos_all[t] + 1 - window_start(pos_all[t], window));
    const int64_t splits = std::max<int64_t>(1, std::min((threads + num_tokens - 1) / num_tokens, longest / kMinChunkKeys));
    chunk = ((longest + splits - 1) / splits + block_size - 1) / block_size * block_size;
  }
  // Token t's chunks are c = first_chunk[t] .. pos_t / chunk (those its window reaches), its parts
  // [first_part[t], first_part[t + 1]).
  std::vector<int64_t> first_part(num_tokens + 1, 0), first_chunk(num_tokens);
  for (int64_t t = 0; t < num_tokens; ++t) {
    first_chunk[t] = window_start(pos_all[t], window) / chunk;
    first_part[t + 1] = first_part[t] + pos_all[t] / chunk + 1 - first_chunk[t];
  }
  // Query blocks: runs of up to kQueryBlock consecutive tokens of one sequence at consecutive
  // positions (a prompt's tokens in prefill; one token per sequence in decode). Work items:
  // (block, chunk) for every chunk of the block's longest context.
  std::vector<int64_t> block_start;
  for (int64_t t = 0; t < num_tokens; ++t)
    if (t == 0 || t - block_start.back() == kQueryBlock || seq_all[t] != seq_all[t - 1] || pos_all[t] != pos_all[t - 1] + 1)
      block_start.push_back(t);
  block_start.push_back(num_tokens);
  // Chunk-major order: consecutive items of a thread read the same chunk of keys and values
  // (384 KB of fp32 K/V at 256 keys of SmolLM2), which then stays in L2 instead of every query
  // block streaming its whole context from L3 or memory again.
  std::vector<std::pair<int64_t, int64_t>> items;  // (block, chunk)
  for (int64_t b = 0; b + 1 < static_cast<int64_t>(block_start.size()); ++b) {
    int64_t top = 0, low = std::numeric_limits<int64_t>::max();
    for (int64_t t = block_start[b]; t < block_start[b + 1]; ++t) {
      top = std::max<int64_t>(top, pos_all[t]);
      low = std::min(low, first_chunk[t]);
    }
    for (int64_t c = low; c < (top + chunk) / chunk; ++c) items.emplace_back(b, c);
  }
  std::stable_sort(items.begin(), items.end(), [](const auto& x, const auto& y) { return x.second < y.second; });
  const int64_t part_size = num_heads * (dim + 2);
  std::unique_ptr<float[]> parts(new float[first_part[num_tokens] * part_size]);  // every part is written whole
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    typename Attend<T>::Scratch scratch;
    float* block_parts[kQueryBlock];
    for (int64_t w = begin; w < end; ++w) {
      const auto [b, c] = items[w];
      const int64_t t0 = block_start[b], nq = block_start[b + 1] - t0;
      for (int64_t i = 0; i < nq; ++i) {  // a query whose keys (its window) miss chunk c takes no part in it
        const int64_t k = c - first_chunk[t0 + i];
        block_parts[i] = 0 <= k && k < first_part[t0 + i + 1] - first_part[t0 + i]
                             ? parts.get() + (first_part[t0 + i] + k) * part_size : nullptr;
      }
      work.run(t0, nq, seq_all[t0], pos_all, c, chunk, window, block_parts, scratch);
    }
  });
  T* out_all = out.data_ptr<T>();
  // Merge each token's chunks in order, rescaled to the common max (tokens split across threads:
  // at 2k-token prefill this is 8 chunks x 9 heads x 64 dims per token, too much to leave serial).
  at::parallel_for(0, num_tokens, 64, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t splits = first_part[t + 1] - first_part[t];
      for (int64_t head = 0; head < num_heads; ++head) {
        const float* first = parts.get() + first_part[t] * part_size + head * (dim + 2);
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < splits; ++c) top = std::max(top, first[c * part_size + dim]);
        float acc[512] = {0.f}, total = 0.f;
        for (int64_t c = 0; c < splits; ++c) {
          const float* part = first + c * part_size;
          const float factor = std::exp(part[dim] - top);  // exactly 1 for the chunk holding the max
          total += part[dim + 1] * factor;
          for (int64_t d = 0; d < dim; ++d) acc[d] += part[d] * factor;
        }
        T* o = out_all + (t * num_heads + head) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d] / total);
      }
    }
  });
}

// q [T, H, D]; kv the whole pool; tables [S, W] int32 (block ids of each sequence);
// seq_of [T] int32 (the sequence of each query); positions [T] int32 (a query sees keys 0..position,
// already written to the pool); chunk_keys 0 = split long contexts as the batch suggests, > 0 = cut
// every query's keys at its multiples (batch-invariant); window > 0: a query sees only its last
// `window` keys (sliding-window layers). Returns [T, H, D] in q's dtype.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& kv, int64_t layer, const at::Tensor& tables,
                           const at::Tensor& seq_of, const at::Tensor& positions, double scale, int64_t chunk_keys,
                           int64_t window) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 6, "q must be [T, H, D] and kv the 6-d pool");
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous(), "q and kv must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must share a dtype");
  TORCH_CHECK(q.size(2) == kv.size(5) && q.size(1) % kv.size(4) == 0, "head shapes of q and kv disagree");
  TORCH_CHECK(0 <= layer && layer < kv.size(1), "layer out of range");
  TORCH_CHECK(q.size(2) <= 512, "head_dim above 512 is not supported");
  TORCH_CHECK(chunk_keys >= 0, "chunk_keys must be >= 0");
  TORCH_CHECK(window >= 0, "window must be >= 0");
  TORCH_CHECK(tables.scalar_type() == at::kInt && seq_of.scalar_type() == at::kInt &&
              positions.scalar_type() == at::kInt, "tables, seq_of and positions must be int32");
  TORCH_CHECK(tables.is_contiguous() && seq_of.numel() == q.size(0) && positions.numel() == q.size(0),
              "one seq_of and one position per query token");
  // A wrong table or position would read outside the pool: refuse it here (cheap: ints only).
  const int64_t num_blocks = kv.size(0), reach = tables.size(1) * kv.size(3), num_seqs = tables.size(0);
  const int32_t* table = tables.data_ptr<int32_t>();
  for (int64_t i = 0; i < tables.numel(); ++i)
    TORCH_CHECK(0 <= table[i] && table[i] < num_blocks, "block table entry ", table[i], " outside the pool");
  at::Tensor seqs = seq_of.contiguous(), pos = positions.contiguous();
  for (int64_t t = 0; t < q.size(0); ++t) {
    TORCH_CHECK(0 <= seqs.data_ptr<int32_t>()[t] && seqs.data_ptr<int32_t>()[t] < num_seqs, "seq_of out of range");
    TORCH_CHECK(0 <= pos.data_ptr<int32_t>()[t] && pos.data_ptr<int32_t>()[t] < reach, "position beyond its block table");
  }
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    attend<scalar_t>(q, kv, layer, tables, seqs, pos, scale, chunk_keys, window, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kvcluster, m) {
  m.def("paged_attention(Tensor q, Tensor kv, int layer, Tensor block_tables, Tensor seq_of, "
        "Tensor positions, float scale, int chunk_keys=0, int window=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcluster, CPU, m) { m.impl("paged_attention", &paged_attention); }
