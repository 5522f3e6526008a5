// Paged attention on CPU over the block cache (the cache writes are in kv_cache.cpp).
// - Chunked prefill: one task per (sequence, kv_head, tile of query tokens). The context is walked 16 keys
//   at a time, widened to fp32 once for all query rows of the tile (the group's heads of each token); an
//   online softmax folds each step into every row, so no buffer grows with the context. Scores and the
//   weighted values are register-blocked multiply-adds over 4 rows (GCC vector types) and the exps are
//   vectorised: with one scalar dot and one std::exp per score it ran 4-5.6x slower than SDPA with a
//   causal mask on the same contiguous K/V (benchmarks/bench_paged_cpu.py), now 0.7-1.0x.
// - Decode (one query token): one task per sequence (per range of its kv heads when there are fewer
//   sequences than threads), two passes over its slots: scores of every head, then one softmax and one
//   weighted sum of the values. fp32 caches are read in place. This took a
//   32-sequence decode step (contexts ~200, GQA 8/4, head_dim 64) from 4.5 ms to 1.1 ms on one core
//   (a one-off timing, warm caches).
// The kernels are compiled for AVX-512, AVX2 + FMA and the baseline, picked at load time (target_clones),
// because the build has no -march flag and the SSE2 copy made chunked prefill slower than the reference.
#include "ops.h"
#include "cache_layout.h"
#include "half_convert.h"
#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace llmfast {
namespace {

// Query tokens per task in chunked prefill: enough rows to reuse each widened step of keys many times
// (before the exp was vectorised, 16 tokens ran float32 prefill 1.25-1.7x slower than 32 at GQA 8/4 and 32/8;
// 32 and 64 measured alike), few enough that a long prefill still splits into tasks for every core.
constexpr int64_t kQueryTile = 64;

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

// Chunked prefill walks the context kKeyStep keys at a time (any block size): one AVX-512 register (two
// AVX2 ones) of scores per query row. The keys of a step are stored transposed, so a row's scores are
// kKeyStep-wide multiply-adds over head_dim with no horizontal sums, and kRowBlock rows share each load of
// the keys and of the values (independent FMA chains hide the FMA latency).
constexpr int64_t kKeyStep = 16;
constexpr int64_t kRowBlock = 4;

static_assert(kLanes == kKeyStep && sizeof(f32x16) == 4 * kKeyStep, "a step of keys is one f32x16");

// s[r, t] = q[r] . k[t] for R rows; kt: the step's keys transposed, (D, kKeyStep).
template <int64_t R>
inline __attribute__((always_inline)) void step_scores(const float* q, const float* kt, int64_t D, float* s) {
  f32x16 acc[R] = {};
  for (int64_t d = 0; d < D; ++d) {
    const f32x16 k = load16(kt + d * kKeyStep);
    for (int64_t r = 0; r < R; ++r) {
      acc[r] += q[r * D + d] * k;
    }
  }
  std::memcpy(s, acc, sizeof(acc));
}

// acc[r] = acc[r] * rescale[r] + sum over t < n of p[r, t] * v[t] for R rows; v: (n, D), p: (R, kKeyStep).
template <int64_t R>
inline __attribute__((always_inline)) void step_values(const float* p, const float* rescale, const float* v,
                                                       int64_t n, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    f32x16 a[R];
    for (int64_t r = 0; r < R; ++r) {
      a[r] = load16(acc + r * D + d) * rescale[r];
    }
    for (int64_t t = 0; t < n; ++t) {
      const f32x16 vt = load16(v + t * D + d);
      for (int64_t r = 0; r < R; ++r) {
        a[r] += p[r * kKeyStep + t] * vt;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(acc + r * D + d, &a[r], sizeof(f32x16));
    }
  }
  for (; d < D; ++d) {  // head_dim not a multiple of kLanes
    for (int64_t r = 0; r < R; ++r) {
      float x = acc[r * D + d] * rescale[r];
      for (int64_t t = 0; t < n; ++t) {
        x += p[r * kKeyStep + t] * v[t * D + d];
      }
      acc[r * D + d] = x;
    }
  }
}

// Attention of query tokens [tile_begin, tile_end) of one sequence (positions context - n_q + i, i counted
// from the sequence's first query) for the query heads of one kv head. q, o: (total_q, heads, head_dim).
template <typename scalar_t>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void attend_tile(const PagedArgs& a, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                 scalar_t* o, int64_t seq, int64_t kv_head, int64_t seq_q_begin, int64_t n_q, int64_t tile_begin,
                 int64_t tile_end) {
  const int64_t D = a.head_dim, group = a.heads / a.kv_heads, bs = a.block_size;
  const int64_t context = a.context_lens[seq];
  const int64_t rows = (tile_end - tile_begin) * group;  // row r: query token tile_begin + r / group
  std::vector<float> buf(rows * D * 2 + rows * (3 + kKeyStep) + 3 * kKeyStep * D);
  float* q_rows = buf.data();               // (rows, D), pre-scaled
  float* acc = q_rows + rows * D;            // (rows, D), zeros
  float* row_max = acc + rows * D;           // (rows,)
  float* row_sum = row_max + rows;           // (rows,)
  float* rescale = row_sum + rows;           // (rows,): exp(old max - new max) of this step
  float* s = rescale + rows;                 // (rows, kKeyStep): scores, then probabilities
  float* kt = s + rows * kKeyStep;           // (D, kKeyStep): the step's keys, transposed
  float* v_step = kt + kKeyStep * D;         // (kKeyStep, D): its values
  float* row = v_step + kKeyStep * D;        // (D,): a widened key
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = seq_q_begin + tile_begin + r / group, head = kv_head * group + r % group;
    widen(q_rows + r * D, q + (token * a.heads + head) * D, D);
    for (int64_t d = 0; d < D; ++d) {
      q_rows[r * D + d] *= a.softmax_scale;
    }
    row_max[r] = -std::numeric_limits<float>::infinity();
    row_sum[r] = 0.f;
  }
  const int32_t* table = a.block_tables + seq * a.max_blocks;
  // The last query of the tile sees the most context; later tokens are masked for every row.
  const int64_t used = context - n_q + tile_end;
  for (int64_t start = 0; start < used; start += kKeyStep) {
    const int64_t n = std::min(kKeyStep, used - start);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = start + t;
      const int64_t slot = table[pos / bs] * a.cache_stride_block + (pos % bs) * a.cache_stride_slot +
                           kv_head * a.cache_stride_head;
      widen(row, k_cache + slot, D);
      for (int64_t d = 0; d < D; ++d) {
        kt[d * kKeyStep + t] = row[d];
      }
      widen(v_step + t * D, v_cache + slot, D);
    }
    for (int64_t t = n; t < kKeyStep; ++t) {  // the last step's missing keys score 0, then get p = 0
      for (int64_t d = 0; d < D; ++d) {
        kt[d * kKeyStep + t] = 0.f;
      }
    }
    int64_t r = 0;
    for (; r + kRowBlock <= rows; r += kRowBlock) {
      step_scores<kRowBlock>(q_rows + r * D, kt, D, s + r * kKeyStep);
    }
    for (; r < rows; ++r) {
      step_scores<1>(q_rows + r * D, kt, D, s + r * kKeyStep);
    }
    // Online softmax: each row's new max, the rescale of what it summed before, its probabilities
    // (0 past its causal limit, aligned bottom-right).
    for (r = 0; r < rows; ++r) {
      const int64_t pos = context - n_q + tile_begin + r / group;
      const int64_t visible = std::min(n, pos + 1 - start);
      float* p = s + r * kKeyStep;
      float block_max = row_max[r];
      for (int64_t t = 0; t < visible; ++t) {
        block_max = std::max(block_max, p[t]);
      }
      // No visible key: nothing changes (rescale 1, p 0). Otherwise exp(-inf) = 0 on the first step.
      rescale[r] = visible > 0 ? std::exp(row_max[r] - block_max) : 1.f;
      const f32x16 e = exp16(load16(p) - block_max);
      const f32x16 probs = kLaneIndex < static_cast<float>(visible) ? e : f32x16{};
      std::memcpy(p, &probs, sizeof(probs));
      float sum = row_sum[r] * rescale[r];
      for (int64_t t = 0; t < kKeyStep; ++t) {
        sum += p[t];
      }
      row_max[r] = block_max;
      row_sum[r] = sum;
    }
    for (r = 0; r + kRowBlock <= rows; r += kRowBlock) {
      step_values<kRowBlock>(s + r * kKeyStep, rescale + r, v_step, n, D, acc + r * D);
    }
    for (; r < rows; ++r) {
      step_values<1>(s + r * kKeyStep, rescale + r, v_step, n, D, acc + r * D);
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

// Decode: the one query token of ``seq`` (query row ``seq``, its last position) for the query heads of kv
// heads [kv_begin, kv_end). A task given every kv head reads the sequence's slots whole (contiguous) block by
// block; fewer sequences than threads split by kv head instead, so one long sequence still uses every core.
// ``scratch`` holds the heads' (heads, context) scores and (heads, D) query rows and accumulators.
template <typename scalar_t>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void attend_decode(
    const PagedArgs& a, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, scalar_t* o,
    int64_t seq, int64_t kv_begin, int64_t kv_end, std::vector<float>& scratch) {
  const int64_t D = a.head_dim, group = a.heads / a.kv_heads, bs = a.block_size;
  const int64_t H = (kv_end - kv_begin) * group, first_head = kv_begin * group;  // this task's heads
  const int64_t context = a.context_lens[seq];
  scratch.resize(H * context + 2 * H * D + D);
  float* scores = scratch.data();       // (H, context)
  float* q_rows = scores + H * context;  // (H, D), pre-scaled
  float* acc = q_rows + H * D;           // (H, D)
  float* row = acc + H * D;              // (D,): a widened cache row
  widen(q_rows, q + (seq * a.heads + first_head) * D, H * D);
  for (int64_t i = 0; i < H * D; ++i) {
    q_rows[i] *= a.softmax_scale;
  }
  const int32_t* table = a.block_tables + seq * a.max_blocks;
  // Both passes walk the sequence's slots in memory order, block by block (no lambdas: they would not
  // be compiled for the clone's instruction set).
  for (int64_t start = 0; start < context; start += bs) {
    const scalar_t* block = k_cache + table[start / bs] * a.cache_stride_block;
    for (int64_t i = 0, n = std::min(bs, context - start); i < n; ++i) {
      for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
        const float* k = fp32_row(block + i * a.cache_stride_slot + kv * a.cache_stride_head, row, D);
        for (int64_t h = (kv - kv_begin) * group; h < (kv - kv_begin + 1) * group; ++h) {
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
    int64_t t = 0;
    for (; t + kKeyStep <= context; t += kKeyStep) {
      const f32x16 e = exp16(load16(s + t) - max_score);
      std::memcpy(s + t, &e, sizeof(e));
    }
    for (; t < context; ++t) {
      s[t] = std::exp(s[t] - max_score);
    }
    for (t = 0; t < context; ++t) {
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
      for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
        const float* v = fp32_row(block + i * a.cache_stride_slot + kv * a.cache_stride_head, row, D);
        for (int64_t h = (kv - kv_begin) * group; h < (kv - kv_begin + 1) * group; ++h) {
          const float p = scores[h * context + start + i];
          float* acc_row = acc + h * D;
          for (int64_t d = 0; d < D; ++d) {
            acc_row[d] += p * v[d];
          }
        }
      }
    }
  }
  scalar_t* out = o + (seq * a.heads + first_head) * D;
  for (int64_t i = 0; i < H * D; ++i) {
    out[i] = from_float<scalar_t>(acc[i]);
  }
}

// The Python wrappers check all of this before calling; see cache_layout.h.
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
      // Whole sequences per task (each slot read in one pass), unless there are fewer than threads: then
      // each sequence's kv heads in as many contiguous ranges as it takes to give every thread one (one
      // range per kv head read each slot in pieces: at 32/8, D128 it ran batch-1 decode at 0.69x SDPA's
      // speed, against 0.85x without any split, on a machine whose speed drifted between those runs).
      const int64_t threads = at::get_num_threads();
      const int64_t splits = num_seqs < threads ? std::min(kv_heads, (threads + num_seqs - 1) / num_seqs) : 1;
      at::parallel_for(0, num_seqs * splits, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch;  // reused by the tasks of this thread
        for (int64_t w = begin; w < end; ++w) {
          const int64_t part = w % splits, kv_begin = part * kv_heads / splits;
          attend_decode<scalar_t>(a, q_ptr, k_ptr, v_ptr, o_ptr, w / splits, kv_begin,
                                  (part + 1) * kv_heads / splits, scratch);
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
  m.impl("paged_attention_cpu", &paged_attention_cpu);
}

}  // namespace llmfast
