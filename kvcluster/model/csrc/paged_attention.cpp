// Attention of query tokens over their sequences' keys, read in place from the paged KV pool.
//
// The pool is [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]; a sequence's keys
// are scattered over its blocks, so torch needs a gather into padded copies per layer. Here each
// query token walks its block table directly: no copies, no padding, no mask. A key row holds every
// kv head, so a block is read front to back once, and the query heads of one GQA group share the
// row they read. fp32 accumulation (AVX-512 dot, axpy and exp, see vec.h) for every input dtype;
// the output is rounded once to the input dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "vec.h"

namespace {

// One work item: query token t, keys [first, last) of its sequence, every head. A key's row holds
// all kv heads side by side, so a block's keys (then its values) are one sequential read. Writes
// each query head's running max and exp-sum and its unnormalised output (fp32) to `part`:
// [heads, dim + 2] = acc[dim], max, sum.
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

  void run(int64_t t, int32_t seq, int64_t first, int64_t last, float* part, std::vector<float>& qf,
           std::vector<float>& scores) const {
    const int32_t* table = table_all + static_cast<int64_t>(seq) * width;
    const int64_t count = last - first;
    for (int64_t i = 0; i < num_heads * dim; ++i) qf[i] = static_cast<float>(q_all[t * num_heads * dim + i]) * scale;
    scores.resize(num_heads * count);  // [heads, count]
    for (int64_t j = first; j < last; j += 16) {  // 16 keys at a time (kvc::dots16: one fixed tree per key)
      const int64_t n = std::min<int64_t>(16, last - j);
      for (int64_t head = 0; head < num_heads; ++head) {
        const int64_t offset = head / group * dim;
        kvc::dots16<T>(qf.data() + head * dim, n, [&](int64_t i) { return key_row(table, j + i) + offset; }, dim,
                       scores.data() + head * count + j - first);
      }
    }
    for (int64_t head = 0; head < num_heads; ++head) {  // softmax numerators, fp32
      float* s = scores.data() + head * count;
      float* out = part + head * (dim + 2);
      const float top = count ? *std::max_element(s, s + count) : -std::numeric_limits<float>::infinity();
      std::fill(out, out + dim, 0.f);
      out[dim] = top;
      out[dim + 1] = count ? kvc::exp_shifted(s, count, top) : 0.f;
    }
    for (int64_t head = 0; head < num_heads; ++head) {  // out += sum_j p_j v_j, keys in order
      const int64_t offset = kv_stride + head / group * dim;
      kvc::weighted_rows<T>(scores.data() + head * count, count,
                            [&](int64_t i) { return key_row(table, first + i) + offset; }, part + head * (dim + 2), dim);
    }
  }
};

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& kv, int64_t layer, const at::Tensor& tables,
            const at::Tensor& seq_of, const at::Tensor& positions, double scale, int64_t chunk_keys, at::Tensor& out) {
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = kv.size(3), num_kv = kv.size(4), group = num_heads / num_kv;
  const Attend<T> work{kv.data_ptr<T>() + layer * kv.stride(1), q.data_ptr<T>(), tables.data_ptr<int32_t>(),
                       tables.size(1), num_heads, num_kv, group, dim, block_size, kv.stride(0), kv.stride(2),
                       kv.stride(3), static_cast<float>(scale)};
  const int32_t* seq_all = seq_of.data_ptr<int32_t>();
  const int32_t* pos_all = positions.data_ptr<int32_t>();
  // Work items: (query token, chunk of its keys). Two ways to chunk:
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
    for (int64_t t = 0; t < num_tokens; ++t) longest = std::max<int64_t>(longest, pos_all[t] + 1);
    const int64_t splits = std::max<int64_t>(1, std::min((threads + num_tokens - 1) / num_tokens, longest / kMinChunkKeys));
    chunk = ((longest + splits - 1) / splits + block_size - 1) / block_size * block_size;
  }
  std::vector<int64_t> first_item(num_tokens + 1, 0);  // token t's chunks are items [first_item[t], first_item[t + 1])
  for (int64_t t = 0; t < num_tokens; ++t) first_item[t + 1] = first_item[t] + (pos_all[t] + chunk) / chunk;
  const int64_t num_items = first_item[num_tokens];
  std::vector<int32_t> item_token(num_items);
  for (int64_t t = 0; t < num_tokens; ++t)
    std::fill(item_token.begin() + first_item[t], item_token.begin() + first_item[t + 1], static_cast<int32_t>(t));
  const int64_t part_size = num_heads * (dim + 2);
  std::unique_ptr<float[]> parts(new float[num_items * part_size]);  // every item writes its whole part
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(num_heads * dim), scores;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = item_token[w], c = w - first_item[t];
      const int64_t context = static_cast<int64_t>(pos_all[t]) + 1;  // keys 0..position
      const int64_t first = c * chunk, last = std::min(context, (c + 1) * chunk);
      work.run(t, seq_all[t], first, last, parts.get() + w * part_size, qf, scores);
    }
  });
  T* out_all = out.data_ptr<T>();
  for (int64_t t = 0; t < num_tokens; ++t) {  // merge the chunks in order: rescale to the common max
    const int64_t splits = first_item[t + 1] - first_item[t];
    for (int64_t head = 0; head < num_heads; ++head) {
      const float* first_part = parts.get() + first_item[t] * part_size + head * (dim + 2);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < splits; ++c) top = std::max(top, first_part[c * part_size + dim]);
      float acc[512] = {0.f}, total = 0.f;
      for (int64_t c = 0; c < splits; ++c) {
        const float* part = first_part + c * part_size;
        const float factor = std::exp(part[dim] - top);  // exactly 1 for the chunk holding the max
        total += part[dim + 1] * factor;
        for (int64_t d = 0; d < dim; ++d) acc[d] += part[d] * factor;
      }
      T* o = out_all + (t * num_heads + head) * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d] / total);
    }
  }
}

// q [T, H, D]; kv the whole pool; tables [S, W] int32 (block ids of each sequence);
// seq_of [T] int32 (the sequence of each query); positions [T] int32 (a query sees keys 0..position,
// already written to the pool); chunk_keys 0 = split long contexts as the batch suggests, > 0 = cut
// every query's keys at its multiples (batch-invariant). Returns [T, H, D] in q's dtype.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& kv, int64_t layer, const at::Tensor& tables,
                           const at::Tensor& seq_of, const at::Tensor& positions, double scale, int64_t chunk_keys) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 6, "q must be [T, H, D] and kv the 6-d pool");
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous(), "q and kv must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must share a dtype");
  TORCH_CHECK(q.size(2) == kv.size(5) && q.size(1) % kv.size(4) == 0, "head shapes of q and kv disagree");
  TORCH_CHECK(0 <= layer && layer < kv.size(1), "layer out of range");
  TORCH_CHECK(q.size(2) <= 512, "head_dim above 512 is not supported");
  TORCH_CHECK(chunk_keys >= 0, "chunk_keys must be >= 0");
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
    attend<scalar_t>(q, kv, layer, tables, seqs, pos, scale, chunk_keys, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kvcluster, m) {
  m.def("paged_attention(Tensor q, Tensor kv, int layer, Tensor block_tables, Tensor seq_of, "
        "Tensor positions, float scale, int chunk_keys=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcluster, CPU, m) { m.impl("paged_attention", &paged_attention); }
