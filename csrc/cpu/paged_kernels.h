// The CPU paged attention kernels (the op, its checks and its split into tasks are in paged.cpp). Each is
// always inlined into one wrapper per instruction set there, so every copy gets that set's vector code.
// - Chunked prefill (attend_tile): one task per (sequence, kv_head, tile of query tokens). The context is
//   walked 16 keys at a time, widened to fp32 once for all query rows of the tile (the group's heads of each
//   token); an online softmax folds each step into every row, so no buffer grows with the context. Scores
//   and the weighted values are register-blocked multiply-adds over 4 rows (GCC vector types), the exps
//   are vectorised and the softmax reduces 16 rows at once: with one scalar dot and one std::exp per score
//   it ran 4-5.6x slower than SDPA with a causal mask on the same contiguous K/V
//   (benchmarks/bench_paged_cpu.py), now 0.96-1.06x.
// - Decode (attend_decode): one task per sequence (per range of its kv heads when there are fewer sequences
//   than threads), two passes over its slots: scores of every head, then one softmax and one weighted sum
//   of the values. fp32 and bf16 caches are read in place (widening bf16 through a scratch copy ran 32/8,
//   D128 decode of 32 x 256 tokens about 1.3x slower). The scores of 16 keys are summed across lanes
//   together (hsum.h): one key at a time, through the stack, float32 decode at head_dim 64 ran 0.43-0.78x
//   SDPA on the same contiguous K/V, now 0.85-1.38x (two runs).
#pragma once

#include "half_convert.h"
#include "hsum.h"
#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace llmfast {
namespace paged {

// Query tokens per task in chunked prefill: enough rows to reuse each widened step of keys many times
// (before the exp was vectorised, 16 tokens ran float32 prefill 1.25-1.7x slower than 32 at GQA 8/4 and 32/8;
// 32 and 64 measured alike), few enough that a long prefill still splits into tasks for every core.
constexpr int64_t kQueryTile = 64;

// Both kernels walk the context kKeyStep keys at a time (any block size): one f32x16 of scores per query row.
// Prefill stores a step's keys transposed, so a row's scores are kKeyStep-wide multiply-adds over head_dim
// with no horizontal sums; decode, with too few rows to pay for the transpose, sums 16 dot products at once
// (hsum.h). kRowBlock rows share each load of the keys (prefill) and of the values (both).
constexpr int64_t kKeyStep = 16;
constexpr int64_t kRowBlock = 4;
static_assert(sizeof(f32x16) == 4 * kKeyStep, "a step of keys is one f32x16");

struct PagedArgs {
  int64_t heads, kv_heads, head_dim, block_size, max_blocks;
  int64_t cache_stride_block, cache_stride_slot, cache_stride_head;  // same for k_cache and v_cache
  const int32_t* block_tables;  // (num_seqs, max_blocks)
  const int32_t* context_lens;  // (num_seqs,)
  float softmax_scale;
};

template <typename scalar_t>
struct Tensors {
  const scalar_t *q, *k_cache, *v_cache;  // q: (total_q, heads, head_dim)
  scalar_t* o;                            // like q
};

// dst[0:n] = src[0:n] widened to fp32
template <typename scalar_t>
inline __attribute__((always_inline)) void widen(float* dst, const scalar_t* src, int64_t n) {
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

// The cache offsets (kv head 0) of positions [start, start + kKeyStep) of a sequence, the ones past its
// context repeating the last one there; returns how many are in the context.
inline __attribute__((always_inline)) int64_t step_slots(const PagedArgs& a, const int32_t* table, int64_t start,
                                                         int64_t context, int64_t* slots) {
  const int64_t n = std::min(kKeyStep, context - start), bs = a.block_size;
  int64_t block = start / bs, in_block = start % bs;
  for (int64_t t = 0; t < n; ++t) {
    slots[t] = table[block] * a.cache_stride_block + in_block * a.cache_stride_slot;
    if (++in_block == bs) {
      in_block = 0;
      ++block;
    }
  }
  std::fill(slots + n, slots + kKeyStep, slots[n - 1]);
  return n;
}

// The element type decode reads a cache's rows as, in place: fp32 and bf16 rows are (bf16 widens in
// registers, see load_vec), fp16 rows are widened into a scratch copy first.
template <typename scalar_t>
using row_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, c10::BFloat16, float>;

// V fp32 lanes from bf16 values: a bf16 is the upper half of an fp32's bits. (hsum.h loads fp32 ones.)
using ::llmfast::load_vec;
template <int V>
struct BitsVec {
  typedef uint16_t u16 __attribute__((vector_size(2 * V)));
  typedef uint32_t u32 __attribute__((vector_size(4 * V)));
};

template <int V>
inline __attribute__((always_inline)) vec_t<V> load_vec(const c10::BFloat16* p) {
  typename BitsVec<V>::u16 half;
  std::memcpy(&half, p, sizeof(half));
  const typename BitsVec<V>::u32 bits = __builtin_convertvector(half, typename BitsVec<V>::u32) << 16;
  vec_t<V> v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// rows[t]: the cache row of slots[t] (+ head_offset) as row_t, the n rows in the context read, the rest
// repeating the last of them; fp16 rows widened into scratch (kKeyStep, D). For decode, which reads each
// row once per head.
template <typename scalar_t>
inline __attribute__((always_inline)) void step_rows_in_place(const scalar_t* cache, const int64_t* slots, int64_t n,
                                                              int64_t head_offset, int64_t D, float* scratch,
                                                              const row_t<scalar_t>** rows) {
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* src = cache + slots[t] + head_offset;
    if constexpr (std::is_same_v<scalar_t, row_t<scalar_t>>) {
      rows[t] = src;
    } else {
      widen(scratch + t * D, src, D);
      rows[t] = scratch + t * D;
    }
  }
  std::fill(rows + n, rows + kKeyStep, rows[n - 1]);
}

// As step_rows_in_place, but every row widened (or copied) into scratch: chunked prefill's row blocks read
// each step's values many times, and rows a slot apart (4 KB at 8 kv heads of 128) share L1 sets.
template <typename scalar_t>
inline __attribute__((always_inline)) void step_rows(const scalar_t* cache, const int64_t* slots, int64_t n,
                                                     int64_t head_offset, int64_t D, float* scratch,
                                                     const float** rows) {
  for (int64_t t = 0; t < n; ++t) {
    widen(scratch + t * D, cache + slots[t] + head_offset, D);
    rows[t] = scratch + t * D;
  }
  std::fill(rows + n, rows + kKeyStep, rows[n - 1]);
}

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

// acc[r] = acc[r] * rescale[r] + sum over t < n of p[r, t] * v[t] for R rows; p: (R, kKeyStep) rows
// p_stride apart, v: n rows of D, acc: (R, D). C vectors of each row at once, so R * C multiply-add chains
// run side by side (one vector of one row at a time waited on its chain: 16 dependent steps).
template <int64_t R, int64_t C, int V, typename T>
inline __attribute__((always_inline)) void values_at(const float* p, int64_t p_stride, const float* rescale,
                                                     const T* const* v, int64_t n, int64_t D, float* acc, int64_t d) {
  vec_t<V> a[R][C];
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      a[r][c] = load_vec<V>(acc + r * D + d + c * V) * rescale[r];
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      const vec_t<V> vt = load_vec<V>(v[t] + d + c * V);
      for (int64_t r = 0; r < R; ++r) {
        a[r][c] += p[r * p_stride + t] * vt;
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(acc + r * D + d, a[r], sizeof(a[r]));
  }
}

template <int64_t R, int V, typename T>
inline __attribute__((always_inline)) void step_values(const float* p, int64_t p_stride, const float* rescale,
                                                       const T* const* v, int64_t n, int64_t D, float* acc) {
  constexpr int64_t C = R >= 8 ? 1 : 8 / R;  // eight chains
  int64_t d = 0;
  for (; d + C * V <= D; d += C * V) {
    values_at<R, C, V, T>(p, p_stride, rescale, v, n, D, acc, d);
  }
  for (; d + V <= D; d += V) {
    values_at<R, 1, V, T>(p, p_stride, rescale, v, n, D, acc, d);
  }
  for (; d < D; ++d) {  // head_dim not a multiple of V
    for (int64_t r = 0; r < R; ++r) {
      float x = acc[r * D + d] * rescale[r];
      for (int64_t t = 0; t < n; ++t) {
        x += p[r * p_stride + t] * to_float(v[t][d]);
      }
      acc[r * D + d] = x;
    }
  }
}

// step_values over ``rows`` rows, kRowBlock at a time.
template <int V>
inline __attribute__((always_inline)) void rows_values(const float* p, int64_t p_stride, const float* rescale,
                                                       const float* const* v, int64_t n, int64_t D, float* acc,
                                                       int64_t rows) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) {
    step_values<kRowBlock, V>(p + r * p_stride, p_stride, rescale + r, v, n, D, acc + r * D);
  }
  for (; r < rows; ++r) {
    step_values<1, V>(p + r * p_stride, p_stride, rescale + r, v, n, D, acc + r * D);
  }
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
      const f32x16 scores = kLaneIndex < static_cast<float>(visible[i]) ? load16(p) : f32x16{} - inf;
      std::memcpy(p, &scores, sizeof(scores));
      parts[i] = combine16<V, Max>(p);
      old_max[i] = row_max[i];
      seen[i] = static_cast<float>(visible[i]);
    } else {
      parts[i] = vec_t<V>{} - inf;
    }
  }
  float step_max[kKeyStep];
  reduce16<V, Max>(parts, step_max);
  const f32x16 new_max = load16(step_max) > old_max ? load16(step_max) : old_max;
  // A row that sees nothing keeps its max (perhaps still -inf, where the exp would be NaN).
  const f32x16 factor = seen > 0.f ? exp16(old_max - new_max) : f32x16{} + 1.f;
  for (int64_t i = 0; i < kKeyStep; ++i) {
    if (i < m) {
      float* p = s + i * kKeyStep;
      const f32x16 e = exp16(load16(p) - new_max[i]);
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
    // Both copied: every row block reads the values (see step_rows); the keys are transposed from the copy.
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
  scratch.resize(H * context + 2 * H * D + kKeyStep * D + H);
  float* scores = scratch.data();        // (H, context)
  float* q_rows = scores + H * context;  // (H, D), pre-scaled
  float* acc = q_rows + H * D;           // (H, D)
  float* widened = acc + H * D;          // (kKeyStep, D): a step's cache rows, unless fp32
  float* inv_sum = widened + kKeyStep * D;  // (H,): 1 / the sum of each head's exps
  widen(q_rows, x.q + (seq * a.heads + first_head) * D, H * D);
  for (int64_t i = 0; i < H * D; ++i) {
    q_rows[i] *= a.softmax_scale;
  }
  const int32_t* table = a.block_tables + seq * a.max_blocks;
  int64_t slots[kKeyStep];
  const row_t<scalar_t>* rows[kKeyStep];
  for (int64_t start = 0; start < context; start += kKeyStep) {
    const int64_t n = step_slots(a, table, start, context, slots);
    for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
      step_rows_in_place(x.k_cache, slots, n, kv * a.cache_stride_head, D, widened, rows);
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
      const f32x16 st = load16(s + t);
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
      const f32x16 e = exp16(load16(s + t) - max_score);
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
  const float ones[kRowBlock] = {1.f, 1.f, 1.f, 1.f};
  for (int64_t start = 0; start < context; start += kKeyStep) {
    const int64_t n = step_slots(a, table, start, context, slots);
    for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
      step_rows_in_place(x.v_cache, slots, n, kv * a.cache_stride_head, D, widened, rows);
      const int64_t h = (kv - kv_begin) * group;
      int64_t r = 0;
      for (; r + kRowBlock <= group; r += kRowBlock) {
        step_values<kRowBlock, V>(scores + (h + r) * context + start, context, ones, rows, n, D,
                                  acc + (h + r) * D);
      }
      for (; r + 2 <= group; r += 2) {
        step_values<2, V>(scores + (h + r) * context + start, context, ones, rows, n, D, acc + (h + r) * D);
      }
      for (; r < group; ++r) {
        step_values<1, V>(scores + (h + r) * context + start, context, ones, rows, n, D, acc + (h + r) * D);
      }
    }
  }
  scalar_t* out = x.o + (seq * a.heads + first_head) * D;
  for (int64_t i = 0; i < H * D; ++i) {
    out[i] = from_float<scalar_t>(acc[i] * inv_sum[i / D]);
  }
}
}  // namespace paged
}  // namespace llmfast
