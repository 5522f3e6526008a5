// Paged KV cache on CPU: write new tokens' keys/values into blocks, and attend over them.
// - Chunked prefill: one task per (sequence, kv_head, tile of query tokens). Each K/V block is widened
//   to fp32 once for all query rows of the tile, then an online softmax folds it into every row, so no
//   buffer grows with the context.
// - Decode (one query token): one task per sequence, two passes over its slots: scores of every head,
//   then one softmax and one weighted sum of the values. fp32 caches are read in place. This took a
//   32-sequence decode step (contexts ~200, GQA 8/4, head_dim 64) from 4.5 ms to 1.1 ms on one core
//   (a one-off timing, warm caches).
// Inner loops over head_dim are plain loops that -O3 vectorises; the kernels are compiled for AVX-512,
// AVX2 + FMA and the baseline, picked at load time (target_clones), because the build has no -march flag
// and the SSE2 copy made chunked prefill slower than the reference.
#include "ops.h"
#include "half_convert.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace llmfast {
namespace {

// Query tokens per task in chunked prefill: enough rows to reuse each widened K/V block many times,
// few enough that a long prefill still splits into tasks for every core.
constexpr int64_t kQueryTile = 16;

// Independent partial sums: without -ffast-math the compiler vectorises a reduction only in this form;
// 16 lanes fill one AVX-512 register or two AVX2 ones, so the FMA chains overlap.
constexpr int64_t kLanes = 16;

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      acc[k] += a[j + k] * b[j + k];
    }
  }
  for (int64_t k = 0; j + k < n; ++k) {
    acc[k] += a[j + k] * b[j + k];
  }
  // Halving steps the compiler vectorises, not 16 dependent scalar adds (they dominated decode).
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t k = 0; k < width; ++k) {
      acc[k] += acc[k + width];
    }
  }
  return acc[0];
}

// dst[0:n] = src[0:n] widened to fp32
template <typename scalar_t>
inline void widen(float* dst, const scalar_t* src, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (cpu_has_f16c()) {
      half_to_float_row(src, dst, n);
      return;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = to_float(src[j]);
  }
}

struct PagedArgs {
  int64_t heads, kv_heads, head_dim, block_size, max_blocks;
  int64_t cache_stride_block, cache_stride_slot, cache_stride_head;  // same for k_cache and v_cache
  const int32_t* block_tables;  // (num_seqs, max_blocks)
  const int32_t* context_lens;  // (num_seqs,)
  float softmax_scale;
};

// Attention of query tokens [q_begin, q_end) of one sequence (positions context - n_q + i, i counted
// from the sequence's first query) for the query heads of one kv head. q, o: (total_q, heads, head_dim).
template <typename scalar_t>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void attend_tile(const PagedArgs& a, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                 scalar_t* o, int64_t seq, int64_t kv_head, int64_t seq_q_begin, int64_t n_q, int64_t tile_begin,
                 int64_t tile_end) {
  const int64_t D = a.head_dim, group = a.heads / a.kv_heads, bs = a.block_size;
  const int64_t context = a.context_lens[seq];
  const int64_t rows = (tile_end - tile_begin) * group;  // row r: query token tile_begin + r / group
  std::vector<float> buf(rows * D * 2 + rows * 2 + bs * D * 2 + bs);
  float* q_rows = buf.data();             // (rows, D), pre-scaled
  float* acc = q_rows + rows * D;          // (rows, D)
  float* row_max = acc + rows * D;         // (rows,)
  float* row_sum = row_max + rows;         // (rows,)
  float* k_block = row_sum + rows;         // (bs, D)
  float* v_block = k_block + bs * D;       // (bs, D)
  float* scores = v_block + bs * D;        // (bs,)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = seq_q_begin + tile_begin + r / group, head = kv_head * group + r % group;
    widen(q_rows + r * D, q + (token * a.heads + head) * D, D);
    for (int64_t d = 0; d < D; ++d) {
      q_rows[r * D + d] *= a.softmax_scale;
    }
    row_max[r] = -std::numeric_limits<float>::infinity();
    row_sum[r] = 0.f;
  }
  // The last query of the tile sees the most context; later tokens are masked for every row.
  const int64_t last_pos = context - n_q + tile_end - 1;
  const int64_t used = last_pos + 1;
  for (int64_t start = 0; start < used; start += bs) {
    const int64_t n = std::min(bs, used - start);
    const int64_t block = a.block_tables[seq * a.max_blocks + start / bs];
    const int64_t base = block * a.cache_stride_block + kv_head * a.cache_stride_head;
    for (int64_t t = 0; t < n; ++t) {
      widen(k_block + t * D, k_cache + base + t * a.cache_stride_slot, D);
      widen(v_block + t * D, v_cache + base + t * a.cache_stride_slot, D);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = context - n_q + tile_begin + r / group;
      const int64_t visible = std::min(n, pos + 1 - start);  // causal, aligned bottom-right
      if (visible <= 0) {
        continue;
      }
      float block_max = row_max[r];
      for (int64_t t = 0; t < visible; ++t) {
        scores[t] = dot(q_rows + r * D, k_block + t * D, D);
        block_max = std::max(block_max, scores[t]);
      }
      const float rescale = std::exp(row_max[r] - block_max);  // 0 on the first block (exp(-inf))
      float* acc_row = acc + r * D;
      for (int64_t d = 0; d < D; ++d) {
        acc_row[d] *= rescale;
      }
      float sum = row_sum[r] * rescale;
      for (int64_t t = 0; t < visible; ++t) {
        const float p = std::exp(scores[t] - block_max);
        sum += p;
        const float* v_row = v_block + t * D;
        for (int64_t d = 0; d < D; ++d) {
          acc_row[d] += p * v_row[d];
        }
      }
      row_max[r] = block_max;
      row_sum[r] = sum;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = seq_q_begin + tile_begin + r / group, head = kv_head * group + r % group;
    // A row with no context (decode of an empty sequence) has sum 0 and outputs 0.
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    scalar_t* out = o + (token * a.heads + head) * D;
    for (int64_t d = 0; d < D; ++d) {
      out[d] = from_float<scalar_t>(acc[r * D + d] * inv);
    }
  }
}

// A cache row as fp32: the row itself for fp32 caches, else widened into ``scratch``.
template <typename scalar_t>
inline const float* fp32_row(const scalar_t* src, float* scratch, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    widen(scratch, src, n);
    return scratch;
  }
}

// Decode: the one query token of ``seq`` (query row ``seq``, its last position) for every head. One
// task reads the sequence's slots whole (all kv heads, contiguous) block by block. ``scratch`` holds
// (heads, context) scores and the (heads, D) query rows and accumulators.
template <typename scalar_t>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void attend_decode(
    const PagedArgs& a, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, scalar_t* o,
    int64_t seq, std::vector<float>& scratch) {
  const int64_t D = a.head_dim, H = a.heads, group = a.heads / a.kv_heads, bs = a.block_size;
  const int64_t context = a.context_lens[seq];
  scratch.resize(H * context + 2 * H * D + D);
  float* scores = scratch.data();       // (H, context)
  float* q_rows = scores + H * context;  // (H, D), pre-scaled
  float* acc = q_rows + H * D;           // (H, D)
  float* row = acc + H * D;              // (D,): a widened cache row
  widen(q_rows, q + seq * H * D, H * D);
  for (int64_t i = 0; i < H * D; ++i) {
    q_rows[i] *= a.softmax_scale;
  }
  const int32_t* table = a.block_tables + seq * a.max_blocks;
  // Both passes walk the sequence's slots in memory order, block by block (no lambdas: they would not
  // be compiled for the clone's instruction set).
  for (int64_t start = 0; start < context; start += bs) {
    const scalar_t* block = k_cache + table[start / bs] * a.cache_stride_block;
    for (int64_t i = 0, n = std::min(bs, context - start); i < n; ++i) {
      for (int64_t kv = 0; kv < a.kv_heads; ++kv) {
        const float* k = fp32_row(block + i * a.cache_stride_slot + kv * a.cache_stride_head, row, D);
        for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
          scores[h * context + start + i] = dot(q_rows + h * D, k, D);
        }
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    float* s = scores + h * context;
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < context; ++t) {
      max_score = std::max(max_score, s[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < context; ++t) {
      s[t] = std::exp(s[t] - max_score);
      sum += s[t];
    }
    // A sequence with no context outputs 0.
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int64_t t = 0; t < context; ++t) {
      s[t] *= inv;
    }
  }
  std::fill(acc, acc + H * D, 0.f);
  for (int64_t start = 0; start < context; start += bs) {
    const scalar_t* block = v_cache + table[start / bs] * a.cache_stride_block;
    for (int64_t i = 0, n = std::min(bs, context - start); i < n; ++i) {
      for (int64_t kv = 0; kv < a.kv_heads; ++kv) {
        const float* v = fp32_row(block + i * a.cache_stride_slot + kv * a.cache_stride_head, row, D);
        for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
          const float p = scores[h * context + start + i];
          float* acc_row = acc + h * D;
          for (int64_t d = 0; d < D; ++d) {
            acc_row[d] += p * v[d];
          }
        }
      }
    }
  }
  for (int64_t i = 0; i < H * D; ++i) {
    o[seq * H * D + i] = from_float<scalar_t>(acc[i]);
  }
}

// The Python wrappers check all of this before calling; these checks keep a direct call of the ops, or a
// torch.compile'd graph (whose index values Python cannot read while tracing), from reading or writing
// out of bounds. Each is one pass over the index tensors, no more than the kernels read anyway.
// Both caches (of one shape, check_caches) are addressed with k_cache's strides: they must agree wherever
// the index can be nonzero (a size-1 dim, such as MQA's one kv head, is never stepped along, so its stride
// may differ).
bool same_layout(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  for (int64_t d = 0; d < k_cache.dim(); ++d) {
    const bool unit = d == k_cache.dim() - 1;
    if (k_cache.size(d) > 1 && (k_cache.stride(d) != v_cache.stride(d) || (unit && k_cache.stride(d) != 1))) {
      return false;
    }
  }
  return true;
}

void check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && v_cache.dtype() == k_cache.dtype(),
              op, ": k_cache and v_cache must be (num_blocks, block_size, kv_heads, head_dim) of one dtype");
  TORCH_CHECK(k_cache.size(1) > 0 && k_cache.size(2) > 0, op, ": block_size and kv_heads must be positive");
}

void check_write_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_caches("write_kv_cache_cpu", k_cache, v_cache);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_cache.size(2) &&
                  k.size(2) == k_cache.size(3) && k.dtype() == k_cache.dtype() && v.dtype() == k.dtype(),
              "write_kv_cache_cpu: k, v must be (tokens, kv_heads, head_dim) matching the caches");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == k.size(0),
              "write_kv_cache_cpu: slot_mapping must be int64 (tokens,)");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < num_slots, "write_kv_cache_cpu: slot_mapping[", t, "] = ",
                slots[t], " is outside [-1, ", num_slots, ")");
  }
}

void check_paged_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                      const std::optional<at::Tensor>& cu_seqlens_q) {
  check_caches("paged_attention_cpu", k_cache, v_cache);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == k_cache.size(3) && q.dtype() == k_cache.dtype() &&
                  q.size(1) % k_cache.size(2) == 0,
              "paged_attention_cpu: q must be (tokens, heads, head_dim), heads a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 &&
                  context_lens.size(0) == block_tables.size(0),
              "paged_attention_cpu: block_tables must be int32 (num_seqs, max_blocks), context_lens int32 "
              "(num_seqs,)");
  const int64_t num_seqs = block_tables.size(0), max_blocks = block_tables.size(1);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1);
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < num_seqs; ++i) {
    TORCH_CHECK(lens[i] >= 0 && lens[i] <= max_blocks * bs, "paged_attention_cpu: context_lens[", i, "] = ",
                lens[i], " is outside [0, ", max_blocks * bs, "]");
    for (int64_t b = 0; b < (lens[i] + bs - 1) / bs; ++b) {
      const int32_t id = tables[i * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "paged_attention_cpu: block_tables[", i, ", ", b, "] = ", id,
                  " is outside [0, ", num_blocks, ")");
    }
  }
  if (!cu_seqlens_q) {
    TORCH_CHECK(q.size(0) == num_seqs, "paged_attention_cpu: decode takes one query row per sequence");
    return;
  }
  TORCH_CHECK(cu_seqlens_q->scalar_type() == at::kInt && cu_seqlens_q->dim() == 1 &&
                  cu_seqlens_q->size(0) == num_seqs + 1 && cu_seqlens_q->is_contiguous(),
              "paged_attention_cpu: cu_seqlens_q must be contiguous int32 (num_seqs + 1,)");
  const int32_t* cu = cu_seqlens_q->const_data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[num_seqs] == q.size(0), "paged_attention_cpu: cu_seqlens_q must run from 0 to ",
              "the number of query rows");
  for (int64_t i = 0; i < num_seqs; ++i) {
    TORCH_CHECK(cu[i + 1] >= cu[i] && cu[i + 1] - cu[i] <= lens[i], "paged_attention_cpu: sequence ", i,
                " has more query tokens than context_lens[", i, "] or a negative count");
  }
}

}  // namespace

void write_kv_cache_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && slot_mapping.is_contiguous(),
              "write_kv_cache_cpu: k, v and slot_mapping must be contiguous");
  check_write_args(k, v, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(same_layout(k_cache, v_cache),
              "write_kv_cache_cpu: caches need unit head_dim stride and equal strides");
  const int64_t tokens = k.size(0), kv_heads = k.size(1), D = k.size(2), bs = k_cache.size(1);
  const int64_t s_block = k_cache.stride(0), s_slot = k_cache.stride(1), s_head = k_cache.stride(2);
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  AT_DISPATCH_V2(k.scalar_type(), "write_kv_cache_cpu", AT_WRAP([&] {
    const scalar_t* k_src = k.const_data_ptr<scalar_t>();
    const scalar_t* v_src = v.const_data_ptr<scalar_t>();
    scalar_t* k_dst = k_cache.mutable_data_ptr<scalar_t>();
    scalar_t* v_dst = v_cache.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kv_heads * D)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t slot = slots[t];
        if (slot < 0) {
          continue;  // padding token
        }
        const int64_t base = (slot / bs) * s_block + (slot % bs) * s_slot;
        for (int64_t h = 0; h < kv_heads; ++h) {
          std::copy_n(k_src + (t * kv_heads + h) * D, D, k_dst + base + h * s_head);
          std::copy_n(v_src + (t * kv_heads + h) * D, D, v_dst + base + h * s_head);
        }
      }
    });
  }), at::kHalf, at::kBFloat16, at::kFloat);
}

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& context_lens,
                               const std::optional<at::Tensor>& cu_seqlens_q, double softmax_scale) {
  TORCH_CHECK(q.is_contiguous() && block_tables.is_contiguous() && context_lens.is_contiguous(),
              "paged_attention_cpu: q, block_tables and context_lens must be contiguous");
  check_paged_args(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q);
  TORCH_CHECK(same_layout(k_cache, v_cache),
              "paged_attention_cpu: caches need unit head_dim stride and equal strides");
  const int64_t num_seqs = block_tables.size(0);
  PagedArgs a{q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), block_tables.size(1),
              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
              block_tables.const_data_ptr<int32_t>(), context_lens.const_data_ptr<int32_t>(),
              static_cast<float>(softmax_scale)};
  at::Tensor o = at::empty_like(q);
  // Chunked prefill: one task per (sequence, kv_head, query tile), so one long prefill still spreads
  // over the cores. Decode needs none of this: its sequence i is query row i.
  struct Task {
    int64_t seq, tile_begin, tile_end;
  };
  std::vector<int64_t> offsets;
  std::vector<Task> tasks;
  if (cu_seqlens_q) {
    const int32_t* cu = cu_seqlens_q->const_data_ptr<int32_t>();
    offsets.assign(cu, cu + num_seqs + 1);
    for (int64_t i = 0; i < num_seqs; ++i) {
      const int64_t n_q = offsets[i + 1] - offsets[i];
      for (int64_t begin = 0; begin < n_q; begin += kQueryTile) {
        tasks.push_back({i, begin, std::min(n_q, begin + kQueryTile)});
      }
    }
  }
  const int64_t kv_heads = a.kv_heads;
  AT_DISPATCH_V2(q.scalar_type(), "paged_attention_cpu", AT_WRAP([&] {
    const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.const_data_ptr<scalar_t>();
    scalar_t* o_ptr = o.mutable_data_ptr<scalar_t>();
    if (!cu_seqlens_q) {
      at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch;  // reused by the tasks of this thread
        for (int64_t i = begin; i < end; ++i) {
          attend_decode<scalar_t>(a, q_ptr, k_ptr, v_ptr, o_ptr, i, scratch);
        }
      });
      return;
    }
    at::parallel_for(0, static_cast<int64_t>(tasks.size()) * kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const Task& t = tasks[w / kv_heads];
        attend_tile<scalar_t>(a, q_ptr, k_ptr, v_ptr, o_ptr, t.seq, w % kv_heads, offsets[t.seq],
                              offsets[t.seq + 1] - offsets[t.seq], t.tile_begin, t.tile_end);
      }
    });
  }), at::kHalf, at::kBFloat16, at::kFloat);
  return o;
}

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("write_kv_cache_cpu", &write_kv_cache_cpu);
  m.impl("paged_attention_cpu", &paged_attention_cpu);
}

}  // namespace llmfast
