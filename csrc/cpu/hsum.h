// Horizontal sums (and maxima) of 16 vectors at once, for the paged kernels' scores and softmax
// (paged_prefill.h, paged_decode.h): a tree of folds, each two lane shuffles and an add, instead of 16
// separate reductions; one reduction per key went through the stack and took most of a decode step's time.
// Vectors are V floats, the width of the instruction set a kernel copy is compiled for (16: AVX-512, 8: AVX2,
// 4: SSE), because GCC builds a shuffle of a vector wider than the registers element by element. Every
// shuffle here has a shape x86 does in one instruction: the same pick within each 128-bit block (shufps), or
// whole 128-bit blocks.
#pragma once

#include "simd.h"

#include <cstring>
#include <utility>

namespace llmfast {

// The lane of (a, b) (b's lanes numbered from V) that lane ``lane`` of the lower (upper = 0) or upper
// (upper = 1) shuffle of a fold takes:
// - level 0, within each 128-bit block: lanes 0, 2 of a, then of b (1, 3 for upper). Two such levels turn
//   4 vectors into one whose lane 4k + i holds vector i's sum over its block k.
// - level 1, whole blocks: a0 b0 a2 b2 (upper: a1 b1 a3 b3), of which V = 8 has the first two.
// - level 2, whole blocks (V = 16): a0 a1 b0 b1 (upper: a2 a3 b2 b3).
constexpr int fold_source(int V, int level, int lane, int upper) {
  const int block = lane / 4, i = lane % 4;
  if (level == 0) {
    return (i >= 2 ? V : 0) + 4 * block + 2 * (i % 2) + upper;
  }
  if (level == 1) {
    return (block % 2 ? V : 0) + 4 * ((block / 2) * 2 + upper) + i;
  }
  return (block >= 2 ? V : 0) + 4 * ((block % 2) + 2 * upper) + i;
}

// How lanes combine: Add, or Max (the larger; NaN-free inputs).
struct Add {
  template <typename T>
  static inline __attribute__((always_inline)) T apply(T a, T b) {
    return a + b;
  }
};

struct Max {
  template <typename T>
  static inline __attribute__((always_inline)) T apply(T a, T b) {
    return a > b ? a : b;
  }
};

template <int V, typename Op, int level, int... lane>
inline __attribute__((always_inline)) vec_t<V> fold(vec_t<V> a, vec_t<V> b, std::integer_sequence<int, lane...>) {
  return Op::apply(__builtin_shufflevector(a, b, fold_source(V, level, lane, 0)...),
                   __builtin_shufflevector(a, b, fold_source(V, level, lane, 1)...));
}

template <int V, typename Op, int level>
inline __attribute__((always_inline)) vec_t<V> fold(vec_t<V> a, vec_t<V> b) {
  return fold<V, Op, level>(a, b, std::make_integer_sequence<int, V>{});
}

// out[t] = x[t]'s V lanes combined by Op, t < 16.
template <int V, typename Op>
inline __attribute__((always_inline)) void reduce16(const vec_t<V>* x, float* out) {
  static_assert(V == 4 || V == 8 || V == 16, "V: the float lanes of an SSE, AVX2 or AVX-512 register");
  vec_t<V> quads[4];  // quads[q] lane 4k + i: x[4q + i] combined over block k
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    quads[q] = fold<V, Op, 0>(fold<V, Op, 0>(x[4 * q], x[4 * q + 1]), fold<V, Op, 0>(x[4 * q + 2], x[4 * q + 3]));
  }
  if constexpr (V == 4) {
    std::memcpy(out, quads, sizeof(quads));
  } else if constexpr (V == 8) {  // x[0:8] then x[8:16], each combined over the two blocks
    const vec_t<V> sums[2] = {fold<V, Op, 1>(quads[0], quads[1]), fold<V, Op, 1>(quads[2], quads[3])};
    std::memcpy(out, sums, sizeof(sums));
  } else {  // x[0:8] combined over blocks (0, 1) and (2, 3), so for x[8:16]; then those two combined
    const vec_t<V> sums = fold<V, Op, 2>(fold<V, Op, 1>(quads[0], quads[1]), fold<V, Op, 1>(quads[2], quads[3]));
    std::memcpy(out, &sums, sizeof(sums));
  }
}

template <int V>
inline __attribute__((always_inline)) void sum16(const vec_t<V>* x, float* out) {
  reduce16<V, Add>(x, out);
}

// The 16 lanes from p[0] on, combined by Op into V lanes.
template <int V, typename Op>
inline __attribute__((always_inline)) vec_t<V> combine16(const float* p) {
  vec_t<V> x = load_vec<V>(p);
  for (int c = V; c < 16; c += V) {
    x = Op::apply(x, load_vec<V>(p + c));
  }
  return x;
}

}  // namespace llmfast
