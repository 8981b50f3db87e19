// Attention of query tokens over their sequences' keys, read in place from the paged KV pool.
//
// The pool is [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]; a sequence's keys
// are scattered over its blocks, so torch needs a gather into padded copies per layer. Here each
// (query token, kv head) walks its block table directly: no copies, no padding, no mask.
// The query heads of one GQA group share every K/V row they read. fp32 accumulation for every
// input dtype; the output is rounded once to the input dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline void load_row(const T* src, float* dst, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]);
}

// One work item: query token t, kv head h, keys [first, last) of its sequence. Writes the
// item's running max and exp-sum per query head and its unnormalised output (fp32) to `part`:
// [group, dim + 2] = acc[dim], max, sum.
template <typename T>
struct Attend {
  const T* pool;
  const T* q_all;
  const int32_t* table_all;
  int64_t width, num_heads, num_kv, group, dim, block_size, block_stride, kv_stride, row_stride;
  float scale;

  void run(int64_t t, int64_t h, int32_t seq, int64_t first, int64_t last, float* part,
           std::vector<float>& qf, std::vector<float>& row, std::vector<float>& scores) const {
    const int32_t* table = table_all + static_cast<int64_t>(seq) * width;
    const int64_t head0 = t * num_heads + h * group, count = last - first;
    for (int64_t g = 0; g < group; ++g) {
      load_row(q_all + (head0 + g) * dim, qf.data() + g * dim, dim);
      for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] *= scale;
    }
    scores.resize(group * count);
    for (int64_t j = first; j < last; ++j) {
      load_row(pool + table[j / block_size] * block_stride + (j % block_size) * row_stride + h * dim, row.data(), dim);
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = qf.data() + g * dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += qg[d] * row[d];
        scores[g * count + j - first] = dot;
      }
    }
    for (int64_t g = 0; g < group; ++g) {  // softmax numerators, fp32
      float* s = scores.data() + g * count;
      float* out = part + g * (dim + 2);
      const float top = count ? *std::max_element(s, s + count) : -std::numeric_limits<float>::infinity();
      float sum = 0.f;
      for (int64_t j = 0; j < count; ++j) {
        s[j] = std::exp(s[j] - top);
        sum += s[j];
      }
      std::fill(out, out + dim, 0.f);
      out[dim] = top;
      out[dim + 1] = sum;
    }
    for (int64_t j = first; j < last; ++j) {
      load_row(pool + table[j / block_size] * block_stride + kv_stride + (j % block_size) * row_stride + h * dim,
               row.data(), dim);
      for (int64_t g = 0; g < group; ++g) {
        const float p = scores[g * count + j - first];
        float* a = part + g * (dim + 2);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) a[d] += p * row[d];
      }
    }
  }
};

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& kv, int64_t layer, const at::Tensor& tables,
            const at::Tensor& seq_of, const at::Tensor& positions, double scale, at::Tensor& out) {
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = kv.size(3), num_kv = kv.size(4), group = num_heads / num_kv;
  const Attend<T> work{kv.data_ptr<T>() + layer * kv.stride(1), q.data_ptr<T>(), tables.data_ptr<int32_t>(),
                       tables.size(1), num_heads, num_kv, group, dim, block_size, kv.stride(0), kv.stride(2),
                       kv.stride(3), static_cast<float>(scale)};
  const int32_t* seq_all = seq_of.data_ptr<int32_t>();
  const int32_t* pos_all = positions.data_ptr<int32_t>();
  // A small batch has fewer (token, kv head) items than threads: split long contexts into
  // chunks of whole blocks, each its own item, merged below (as flash-decoding does on GPUs).
  const int64_t items = num_tokens * num_kv, threads = at::get_num_threads();
  int64_t longest = 1;
  for (int64_t t = 0; t < num_tokens; ++t) longest = std::max<int64_t>(longest, pos_all[t] + 1);
  const int64_t splits = std::max<int64_t>(1, std::min((2 * threads + items - 1) / items, longest / 256));
  const int64_t chunk = ((longest + splits - 1) / splits + block_size - 1) / block_size * block_size;
  std::vector<float> parts(items * splits * group * (dim + 2));

  at::parallel_for(0, items * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), row(dim), scores;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t item = w / splits, c = w % splits, t = item / num_kv, h = item % num_kv;
      const int64_t context = static_cast<int64_t>(pos_all[t]) + 1;  // keys 0..position
      const int64_t first = std::min(context, c * chunk), last = std::min(context, (c + 1) * chunk);
      work.run(t, h, seq_all[t], first, last, parts.data() + w * group * (dim + 2), qf, row, scores);
    }
  });
  T* out_all = out.data_ptr<T>();
  for (int64_t item = 0; item < items; ++item) {  // merge the chunks: rescale to the common max
    const int64_t t = item / num_kv, h = item % num_kv;
    for (int64_t g = 0; g < group; ++g) {
      const float* first_part = parts.data() + (item * splits * group + g) * (dim + 2);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < splits; ++c) top = std::max(top, first_part[c * group * (dim + 2) + dim]);
      float acc[512] = {0.f}, total = 0.f;
      for (int64_t c = 0; c < splits; ++c) {
        const float* part = first_part + c * group * (dim + 2);
        if (part[dim + 1] == 0.f) continue;  // an empty chunk (a shorter sequence)
        const float factor = std::exp(part[dim] - top);
        total += part[dim + 1] * factor;
        for (int64_t d = 0; d < dim; ++d) acc[d] += part[d] * factor;
      }
      T* o = out_all + (t * num_heads + h * group + g) * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d] / total);
    }
  }
}

// q [T, H, D]; kv the whole pool; tables [S, W] int32 (block ids of each sequence);
// seq_of [T] int32 (the sequence of each query); positions [T] int32 (a query sees keys 0..position,
// already written to the pool). Returns [T, H, D] in q's dtype.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& kv, int64_t layer, const at::Tensor& tables,
                           const at::Tensor& seq_of, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 6, "q must be [T, H, D] and kv the 6-d pool");
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous(), "q and kv must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must share a dtype");
  TORCH_CHECK(q.size(2) == kv.size(5) && q.size(1) % kv.size(4) == 0, "head shapes of q and kv disagree");
  TORCH_CHECK(0 <= layer && layer < kv.size(1), "layer out of range");
  TORCH_CHECK(q.size(2) <= 512, "head_dim above 512 is not supported");
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
    attend<scalar_t>(q, kv, layer, tables, seqs, pos, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kvcluster, m) {
  m.def("paged_attention(Tensor q, Tensor kv, int layer, Tensor block_tables, Tensor seq_of, "
        "Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcluster, CPU, m) { m.impl("paged_attention", &paged_attention); }
