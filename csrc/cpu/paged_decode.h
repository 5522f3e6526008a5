// Decode on CPU (attend_decode): one task per sequence (per range of its kv heads when there are fewer
// sequences than threads), two passes over its slots: scores of every head, then one softmax and one weighted
// sum of the values. Caches are read in place, fp16 ones in the AVX-512 and AVX2 copies (row_t): widening
// through a scratch copy ran 32/8, D128 decode of 32 x 256 tokens about 1.3x slower in bf16 and 1.15-1.32x
// in fp16 (1.17-1.78x at 1 x 4096), single-threaded. The scores of 16 keys are summed across lanes together
// (hsum.h): one key at a time, through the stack, float32 decode at head_dim 64 ran 0.43-0.78x SDPA on the
// same contiguous K/V, now 0.78-1.38x (three runs).
#pragma once

#include "paged_steps.h"

namespace llmfast {
namespace paged {

// s[t] = q . rows[t] for one query row against kKeyStep keys, t < n. V: the float lanes of the kernel
// copy's vector registers (hsum.h). Eight keys at a time along head_dim: eight independent multiply-add
// chains (one key at a time left each dot waiting on its own chain).
template <int V, typename T>
inline __attribute__((always_inline)) void row_scores(const float* q, const T* const* rows, int64_t D, int64_t n,
                                                      float* s) {
  constexpr int64_t kKeys = 8;
  vec_t<V> dots[kKeyStep];
  for (int64_t t0 = 0; t0 < kKeyStep; t0 += kKeys) {
    vec_t<V> acc[kKeys] = {};
    int64_t d = 0;
    for (; d + V <= D; d += V) {
      const vec_t<V> qd = load_vec<V>(q + d);
      for (int64_t t = 0; t < kKeys; ++t) {
        acc[t] += qd * load_vec<V>(rows[t0 + t] + d);
      }
    }
    for (; d < D; ++d) {  // head_dim not a multiple of V
      for (int64_t t = 0; t < kKeys; ++t) {
        acc[t][0] += q[d] * to_float(rows[t0 + t][d]);
      }
    }
    std::memcpy(dots + t0, acc, sizeof(acc));
  }
  float sums[kKeyStep];
  sum16<V>(dots, sums);
  std::memcpy(s, sums, n * sizeof(float));
}

// Decode: the one query token of ``seq`` (query row ``seq``, its last position) for the query heads of kv
// heads [kv_begin, kv_end). Both passes walk the context a step of 16 slots at a time, every kv head of the
// range per step, so a task given all kv heads reads its slots whole.
// ``scratch`` holds the heads' (heads, context) scores and (heads, D) query rows and accumulators.
template <typename scalar_t, int V>
inline __attribute__((always_inline)) void attend_decode(const PagedArgs& a, const Tensors<scalar_t>& x,
                                                         int64_t seq, int64_t kv_begin, int64_t kv_end,
                                                         std::vector<float>& scratch) {
  const int64_t D = a.head_dim, group = a.heads / a.kv_heads;
  const int64_t H = (kv_end - kv_begin) * group, first_head = kv_begin * group;  // this task's heads
  const int64_t context = a.context_lens[seq];
  scratch.resize(H * context + 2 * H * D + kKeyStep * D + H + group);
  float* scores = scratch.data();           // (H, context)
  float* q_rows = scores + H * context;     // (H, D), pre-scaled
  float* acc = q_rows + H * D;              // (H, D)
  float* widened = acc + H * D;             // (kKeyStep, D): a step's fp16 cache rows (baseline copy)
  float* inv_sum = widened + kKeyStep * D;  // (H,): 1 / the sum of each head's exps
  float* ones = inv_sum + H;                // (group,): the values' rescale, none in decode
  widen(q_rows, x.q + (seq * a.heads + first_head) * D, H * D);
  for (int64_t i = 0; i < H * D; ++i) {
    q_rows[i] *= a.softmax_scale;
  }
  const int32_t* table = a.block_tables + seq * a.max_blocks;
  int64_t slots[kKeyStep];
  const row_t<scalar_t, V>* rows[kKeyStep];
  for (int64_t start = 0; start < context; start += kKeyStep) {
    const int64_t n = step_slots(a, table, start, context, slots);
    for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
      step_rows_in_place<V>(x.k_cache, slots, n, kv * a.cache_stride_head, D, widened, rows);
      for (int64_t h = (kv - kv_begin) * group; h < (kv - kv_begin + 1) * group; ++h) {
        row_scores<V>(q_rows + h * D, rows, D, n, scores + h * context + start);
      }
    }
  }
  // Softmax of each head's scores, unnormalised: the values' weighted sum is scaled by 1 / sum at the end.
  for (int64_t h = 0; h < H; ++h) {
    float* s = scores + h * context;
    f32x16 lane_max = f32x16{} - std::numeric_limits<float>::infinity();
    int64_t t = 0;
    for (; t + kKeyStep <= context; t += kKeyStep) {
      const f32x16 st = load_vec<16>(s + t);
      lane_max = st > lane_max ? st : lane_max;
    }
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < kKeyStep; ++l) {
      max_score = std::max(max_score, lane_max[l]);
    }
    for (int64_t u = t; u < context; ++u) {
      max_score = std::max(max_score, s[u]);
    }
    f32x16 lane_sum = {};
    for (t = 0; t + kKeyStep <= context; t += kKeyStep) {
      const f32x16 e = exp16(load_vec<16>(s + t) - max_score);
      std::memcpy(s + t, &e, sizeof(e));
      lane_sum += e;
    }
    float sum = 0.f;
    for (; t < context; ++t) {
      s[t] = std::exp(s[t] - max_score);
      sum += s[t];
    }
    for (int64_t l = 0; l < kKeyStep; ++l) {
      sum += lane_sum[l];
    }
    inv_sum[h] = sum > 0.f ? 1.f / sum : 0.f;  // a sequence with no context outputs 0
  }
  std::fill(acc, acc + H * D, 0.f);
  std::fill(ones, ones + group, 1.f);
  for (int64_t start = 0; start < context; start += kKeyStep) {
    const int64_t n = step_slots(a, table, start, context, slots);
    for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
      step_rows_in_place<V>(x.v_cache, slots, n, kv * a.cache_stride_head, D, widened, rows);
      const int64_t h = (kv - kv_begin) * group;
      rows_values<V>(scores + h * context + start, context, ones, rows, n, D, acc + h * D, group);
    }
  }
  scalar_t* out = x.o + (seq * a.heads + first_head) * D;
  for (int64_t i = 0; i < H * D; ++i) {
    out[i] = from_float<scalar_t>(acc[i] * inv_sum[i / D]);
  }
}

}  // namespace paged
}  // namespace llmfast
