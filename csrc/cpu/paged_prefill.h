// Chunked prefill on CPU (attend_tile): one task per (sequence, kv_head, tile of query tokens). The context is
// walked 16 keys at a time, widened to fp32 once for all query rows of the tile (the group's heads of each
// token); an online softmax folds each step into every row, so no buffer grows with the context. Scores and
// the weighted values are register-blocked multiply-adds over 4 rows (GCC vector types), the exps are
// vectorised and the softmax reduces 16 rows at once: with one scalar dot and one std::exp per score it ran
// 4-5.6x slower than SDPA with a causal mask on the same contiguous K/V (benchmarks/bench_paged_cpu.py),
// now 0.96-1.11x (two runs).
#pragma once

#include "paged_steps.h"

namespace llmfast {
namespace paged {

// Query tokens per task in chunked prefill: enough rows to reuse each widened step of keys many times
// (before the exp was vectorised, 16 tokens ran float32 prefill 1.25-1.7x slower than 32 at GQA 8/4 and 32/8;
// 32 and 64 measured alike), few enough that a long prefill still splits into tasks for every core.
constexpr int64_t kQueryTile = 64;

// s[r, t] = q[r] . k[t] for R rows; kt: the step's keys transposed, (D, kKeyStep).
template <int64_t R>
inline __attribute__((always_inline)) void step_scores(const float* q, const float* kt, int64_t D, float* s) {
  f32x16 acc[R] = {};
  for (int64_t d = 0; d < D; ++d) {
    const f32x16 k = load_vec<16>(kt + d * kKeyStep);
    for (int64_t r = 0; r < R; ++r) {
      acc[r] += q[r * D + d] * k;
    }
  }
  std::memcpy(s, acc, sizeof(acc));
}

// One step of the online softmax for m <= 16 rows: s (m, kKeyStep) holds row i's scores, of which the first
// visible[i] count. Row i's max and sum move on to this step; its scores become probabilities (0 past
// visible[i]) relative to the new max, and rescale[i] = exp(old max - new max) (1 for a row that sees
// nothing). The rows' maxima and sums are reduced 16 at a time (hsum.h): one row at a time, 16 dependent
// scalar steps each took about as long as the row's multiply-adds.
template <int V>
inline __attribute__((always_inline)) void step_softmax(float* s, int64_t m, const int64_t* visible,
                                                        float* row_max, float* row_sum, float* rescale) {
  const float inf = std::numeric_limits<float>::infinity();
  f32x16 old_max = f32x16{} - inf, seen = {};  // per row; the rows past m see nothing
  vec_t<V> parts[kKeyStep];
  for (int64_t i = 0; i < kKeyStep; ++i) {
    if (i < m) {
      float* p = s + i * kKeyStep;
      const f32x16 scores = kLaneIndex < static_cast<float>(visible[i]) ? load_vec<16>(p) : f32x16{} - inf;
      std::memcpy(p, &scores, sizeof(scores));
      parts[i] = combine16<V, Max>(p);
      old_max[i] = row_max[i];
      seen[i] = static_cast<float>(visible[i]);
    } else {
      parts[i] = vec_t<V>{} - inf;
    }
  }
  float maxima[kKeyStep];
  reduce16<V, Max>(parts, maxima);
  const f32x16 step_max = load_vec<16>(maxima), new_max = step_max > old_max ? step_max : old_max;
  // A row that sees nothing keeps its max (perhaps still -inf, where the exp would be NaN).
  const f32x16 factor = seen > 0.f ? exp16(old_max - new_max) : f32x16{} + 1.f;
  for (int64_t i = 0; i < kKeyStep; ++i) {
    if (i < m) {
      float* p = s + i * kKeyStep;
      const f32x16 e = exp16(load_vec<16>(p) - new_max[i]);
      const f32x16 probs = kLaneIndex < seen[i] ? e : f32x16{};
      std::memcpy(p, &probs, sizeof(probs));
      parts[i] = combine16<V, Add>(p);
    } else {
      parts[i] = vec_t<V>{};
    }
  }
  float sums[kKeyStep];
  sum16<V>(parts, sums);
  for (int64_t i = 0; i < m; ++i) {
    row_sum[i] = row_sum[i] * factor[i] + sums[i];
    row_max[i] = new_max[i];
    rescale[i] = factor[i];
  }
}

// Attention of query tokens [tile_begin, tile_end) of one sequence (positions context - n_q + i, i counted
// from the sequence's first query) for the query heads of one kv head. q, o: (total_q, heads, head_dim).
template <typename scalar_t, int V>
inline __attribute__((always_inline)) void attend_tile(const PagedArgs& a, const Tensors<scalar_t>& x, int64_t seq,
                                                       int64_t kv_head, int64_t seq_q_begin, int64_t n_q,
                                                       int64_t tile_begin, int64_t tile_end) {
  const int64_t D = a.head_dim, group = a.heads / a.kv_heads, head_offset = kv_head * a.cache_stride_head;
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
  float* widened = kt + kKeyStep * D;        // (2, kKeyStep, D): the step's keys and values, unless fp32
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = seq_q_begin + tile_begin + r / group, head = kv_head * group + r % group;
    widen(q_rows + r * D, x.q + (token * a.heads + head) * D, D);
    for (int64_t d = 0; d < D; ++d) {
      q_rows[r * D + d] *= a.softmax_scale;
    }
    row_max[r] = -std::numeric_limits<float>::infinity();
    row_sum[r] = 0.f;
  }
  const int32_t* table = a.block_tables + seq * a.max_blocks;
  int64_t slots[kKeyStep];
  const float* k_rows[kKeyStep];
  const float* v_rows[kKeyStep];
  // The last query of the tile sees the most context; later tokens are masked for every row.
  const int64_t used = context - n_q + tile_end;
  for (int64_t start = 0; start < used; start += kKeyStep) {
    const int64_t n = step_slots(a, table, start, used, slots);
    // Both copied (see step_rows); the keys are transposed from the copy.
    step_rows(x.k_cache, slots, n, head_offset, D, widened, k_rows);
    step_rows(x.v_cache, slots, n, head_offset, D, widened + kKeyStep * D, v_rows);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t d = 0; d < D; ++d) {
        kt[d * kKeyStep + t] = k_rows[t][d];
      }
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
    // Online softmax, 16 rows at a time; a row sees the keys up to its position (bottom-right causal).
    for (r = 0; r < rows; r += kKeyStep) {
      int64_t visible[kKeyStep];
      for (int64_t i = 0; i < kKeyStep && r + i < rows; ++i) {
        const int64_t pos = context - n_q + tile_begin + (r + i) / group;
        visible[i] = std::max<int64_t>(0, std::min(n, pos + 1 - start));
      }
      step_softmax<V>(s + r * kKeyStep, std::min(kKeyStep, rows - r), visible, row_max + r, row_sum + r,
                      rescale + r);
    }
    rows_values<V>(s, kKeyStep, rescale, v_rows, n, D, acc, rows);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = seq_q_begin + tile_begin + r / group, head = kv_head * group + r % group;
    // A row with no context (decode of an empty sequence) has sum 0 and outputs 0.
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    scalar_t* out = x.o + (token * a.heads + head) * D;
    for (int64_t d = 0; d < D; ++d) {
      out[d] = from_float<scalar_t>(acc[r * D + d] * inv);
    }
  }
}

}  // namespace paged
}  // namespace llmfast
