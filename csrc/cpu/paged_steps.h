// What the CPU paged attention kernels (paged_prefill.h, paged_decode.h) share: their arguments, the walk over
// a sequence's slots 16 keys at a time, reading cache rows as fp32, and the weighted sum of the values.
// Everything here is always inlined into the kernel copy of each instruction set (paged.cpp).
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

// The element type decode reads a cache's rows as, in place, in the kernel copy of V float lanes: fp32 and bf16
// rows are (bf16 widens in registers, see load_vec), fp16 rows too where the copy can widen them with one
// instruction (AVX-512, AVX2 + F16C); the baseline copy widens fp16 rows into a scratch copy first.
template <typename scalar_t, int V>
using row_t = std::conditional_t<std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
                                     (std::is_same_v<scalar_t, c10::Half> && V >= 8),
                                 scalar_t, float>;

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

#if defined(__x86_64__)
// 16 and 8 fp16 values widened by one vcvtph2ps. Not always_inline: an always_inline function with target
// options cannot be inlined into load_vec, which has none; GCC inlines these into the kernel copies of
// their instruction set once load_vec is inlined there (no call is left in the build: check with objdump).
// GCC 12's __builtin_convertvector of _Float16 vectors converts lane by lane (or calls libgcc).
__attribute__((target("avx512f"))) inline vec_t<16> widen_half16(const c10::Half* p) {
  // all 16 lanes; _mm512_cvtph_ps's undefined pass-through draws a false -Wmaybe-uninitialized from GCC 12
  const __m512 v = _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  vec_t<16> out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}

__attribute__((target("avx,f16c"))) inline vec_t<8> widen_half8(const c10::Half* p) {
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  vec_t<8> out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}

// V fp32 lanes from fp16 values, in the copies whose row_t keeps fp16 rows.
template <int V>
inline __attribute__((always_inline)) vec_t<V> load_vec(const c10::Half* p) {
  static_assert(V == 16 || V == 8, "the baseline copy reads fp16 rows widened into scratch (row_t)");
  if constexpr (V == 16) {
    return widen_half16(p);
  } else {
    return widen_half8(p);
  }
}
#endif

// rows[t]: the cache row of slots[t] (+ head_offset) widened (or copied) into scratch (kKeyStep, D) as fp32,
// the n rows in the context read, the rest repeating the last of them. Chunked prefill reads rows this way:
// its row blocks read each step's values many times, and rows a slot apart (4 KB at 8 kv heads of 128) share
// L1 sets.
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

// As step_rows, but the rows that row_t keeps are read in place; for decode, which reads each row once per
// head.
template <int V, typename scalar_t>
inline __attribute__((always_inline)) void step_rows_in_place(const scalar_t* cache, const int64_t* slots, int64_t n,
                                                              int64_t head_offset, int64_t D, float* scratch,
                                                              const row_t<scalar_t, V>** rows) {
  if constexpr (!std::is_same_v<scalar_t, row_t<scalar_t, V>>) {
    step_rows(cache, slots, n, head_offset, D, scratch, rows);
  } else {
    for (int64_t t = 0; t < n; ++t) {
      rows[t] = cache + slots[t] + head_offset;
    }
    std::fill(rows + n, rows + kKeyStep, rows[n - 1]);
  }
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

// step_values over ``rows`` rows, kRowBlock, then 2, then 1 at a time.
template <int V, typename T>
inline __attribute__((always_inline)) void rows_values(const float* p, int64_t p_stride, const float* rescale,
                                                       const T* const* v, int64_t n, int64_t D, float* acc,
                                                       int64_t rows) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) {
    step_values<kRowBlock, V>(p + r * p_stride, p_stride, rescale + r, v, n, D, acc + r * D);
  }
  for (; r + 2 <= rows; r += 2) {
    step_values<2, V>(p + r * p_stride, p_stride, rescale + r, v, n, D, acc + r * D);
  }
  for (; r < rows; ++r) {
    step_values<1, V>(p + r * p_stride, p_stride, rescale + r, v, n, D, acc + r * D);
  }
}

}  // namespace paged
}  // namespace llmfast
