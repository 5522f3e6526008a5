// The register-tiled kernel of the CPU quantized matmul (quant_matmul.cpp): one block of kCols output
// columns for a panel of rows, its int8/int4 codes dequantized in vector registers. Written with GCC
// vector extensions of V float32 lanes, so that each instruction set's copy (quant_matmul.cpp) gets its
// own width from this one source; everything here is always inlined into those copies.
#pragma once

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#define LLMFAST_ALWAYS_INLINE inline __attribute__((always_inline))

namespace llmfast {
namespace quant {

// Output columns per tile. Two keep an 8-row AVX-512 tile (16 accumulators, plus each column's codes,
// scales, zeros and dequantized weights) inside the 32 vector registers.
constexpr int kCols = 2;

// Lane l of the result is v[index[l]].
template <typename vf, typename vi>
LLMFAST_ALWAYS_INLINE vf permute(vf v, vi index) {
#if defined(__clang__)  // clang has no variable-index __builtin_shuffle
  vf out;
  for (int l = 0; l < static_cast<int>(sizeof(vf) / sizeof(float)); ++l) {
    out[l] = v[index[l]];
  }
  return out;
#else
  return __builtin_shuffle(v, index);  // one vpermps with AVX2 / AVX-512
#endif
}

template <int V>
LLMFAST_ALWAYS_INLINE float hsum(typename Vec<V>::f v) {
  float s = 0.f;
  for (int l = 0; l < V; ++l) {
    s += v[l];
  }
  return s;
}

// One block of output columns for rows [row_begin, row_end), as raw pointers.
struct Block {
  // (M, K) float32 rows in the chunked order of prepare_x.
  const float* x;
  int64_t k;
  // The block's first column: (K,) int8 or (K / 8,) int32; column c starts c * qweight_stride bytes
  // later. A block of one column (the last, when N is odd) has stride 0: it is computed twice and
  // stored once, so that the tile kernels come in one width only.
  const char* qweight;
  int64_t qweight_stride;
  // Weights are prefetched this many bytes ahead of their reads: the next block's, at the offset being
  // read (rows of consecutive blocks are contiguous). Without it a batch of 1 to 4 rows waited on
  // memory: on a 2-core AMD EPYC (Zen 5) VM, K x N = 4096 x 11008, cold weights, M = 1 went from
  // 1.96 to 1.49 ms (int8) and 1.27 to 0.85 ms (int4). Fixed distances of 2 to 8 KiB matched it on
  // some shapes and lost up to 20% on others.
  int64_t prefetch_distance;
  // (kCols, scales_stride) float32 per group: the scales and, for int4, the value of code 0
  // (zero - 8 * scale), from prepare_scales; padded so that a vector load from any group stays
  // inside. Stride 0 for a block of one column.
  const float* scales;
  const float* zeros;
  int64_t scales_stride;
  int group_shift;  // the group of code k is k >> group_shift (kOneGroup: a single group per row)
  // lane l of a chunk (see tile) belongs to the chunk's first group + lane_group[l], l < V
  int32_t lane_group[16];
  int cols;  // 1 .. kCols
  int bits;  // 8 or 4
  int64_t row_begin, row_end;
  float* y;  // y + r * y_stride + c for row r, column c of the block
  int64_t y_stride;
  const float* bias;  // (cols,) or null
};

// A shift that sends every code index (< 2^62) to group 0.
constexpr int kOneGroup = 62;

// Codes per int32 word: int4 packs 8 (llmfast.quant.pack_int4); int8's 4 bytes are read as one word.
template <int kBits>
constexpr int kCodesPerWord = 32 / kBits;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "int8 codes are read four to an int32 word");

// The weights of code j of each word: int4 (words >> 4j) & 15 in [0, 15], times scale, plus zero
// (the value of code 0); int8 byte j, sign-extended, times scale.
template <int kBits, typename vf, typename vi>
LLMFAST_ALWAYS_INLINE vf dequantize(vi words, int j, vf scale, vf zero) {
  if constexpr (kBits == 4) {
    return __builtin_convertvector((words >> (4 * j)) & 15, vf) * scale + zero;
  } else {
    return __builtin_convertvector((words << (24 - 8 * j)) >> 24, vf) * scale;
  }
}

// out[r][c] = sum_k x[r][k] * w[c][k] for MR rows and the block's kCols columns.
//
// A chunk of V int32 words (P = kCodesPerWord codes each) is one vector of words; its code j of every
// word meets the vector of x that prepare_x filled with x[P * l + j] in lane l, so unpacking takes one
// or two shifts per V codes and no shuffles. Lane l's scale is that of word l's group: a permutation of
// the (at most V) group scales the chunk touches.
template <int V, int kBits, int MR>
LLMFAST_ALWAYS_INLINE void tile(const Block& b, const float* x, float (&out)[MR][kCols]) {
  using vf = typename Vec<V>::f;
  using vi = typename Vec<V>::i;
  constexpr int P = kCodesPerWord<kBits>;
  constexpr int kChunk = P * V;  // codes per chunk
  const int64_t chunks = b.k / kChunk;
  const vi lane_group = load<vi>(b.lane_group);
  vf acc[MR][kCols] = {};
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t group = (c * kChunk) >> b.group_shift;
    vi words[kCols];
    vf scale[kCols], zero[kCols] = {};
#pragma GCC unroll 4
    for (int n = 0; n < kCols; ++n) {
      const char* chunk_words = b.qweight + n * b.qweight_stride + c * (kChunk * kBits / 8);
      // summed as integers: the address may lie past the end of qweight (a prefetch never faults)
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(chunk_words) + b.prefetch_distance;
      __builtin_prefetch(reinterpret_cast<const void*>(ahead));
      words[n] = load<vi>(chunk_words);
      scale[n] = permute(load<vf>(b.scales + n * b.scales_stride + group), lane_group);
      if constexpr (kBits == 4) {
        zero[n] = permute(load<vf>(b.zeros + n * b.scales_stride + group), lane_group);
      }
    }
    const float* xc = x + c * kChunk;
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) {  // unrolled, so every shift count is a constant
      vf w[kCols];
#pragma GCC unroll 4
      for (int n = 0; n < kCols; ++n) {
        w[n] = dequantize<kBits>(words[n], j, scale[n], zero[n]);
      }
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const vf xv = load<vf>(xc + r * b.k + j * V);
#pragma GCC unroll 4
        for (int n = 0; n < kCols; ++n) {
          acc[r][n] += xv * w[n];
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int n = 0; n < kCols; ++n) {
      out[r][n] = hsum<V>(acc[r][n]);
    }
  }
  // codes past the last whole chunk, whose x prepare_x left in order
  for (int64_t k = chunks * kChunk; k < b.k; ++k) {
    for (int n = 0; n < kCols; ++n) {
      const char* column = b.qweight + n * b.qweight_stride;
      const int64_t group = k >> b.group_shift;
      float w;
      if constexpr (kBits == 4) {
        int32_t word;
        std::memcpy(&word, column + k / 8 * 4, 4);
        const float c = static_cast<float>((static_cast<uint32_t>(word) >> (4 * (k % 8))) & 15u);
        w = c * b.scales[n * b.scales_stride + group] + b.zeros[n * b.scales_stride + group];
      } else {
        w = static_cast<float>(static_cast<int8_t>(column[k])) * b.scales[n * b.scales_stride + group];
      }
      for (int r = 0; r < MR; ++r) {
        out[r][n] += x[r * b.k + k] * w;
      }
    }
  }
}

template <int V, int kBits, int MR>
LLMFAST_ALWAYS_INLINE void store_tile(const Block& b, int64_t row) {
  float out[MR][kCols];
  tile<V, kBits, MR>(b, b.x + row * b.k, out);
  for (int r = 0; r < MR; ++r) {
    for (int n = 0; n < b.cols; ++n) {
      b.y[(row + r) * b.y_stride + n] = out[r][n] + (b.bias ? b.bias[n] : 0.f);
    }
  }
}

// A tile of `rows` (1 .. MR) rows: the row count is a template argument so the accumulators stay in
// registers.
template <int V, int kBits, int MR>
LLMFAST_ALWAYS_INLINE void tile_rows(const Block& b, int64_t row, int64_t rows) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      tile_rows<V, kBits, MR - 1>(b, row, rows);
      return;
    }
  }
  store_tile<V, kBits, MR>(b, row);
}

template <int V, int MR>
LLMFAST_ALWAYS_INLINE void block_rows(const Block& b) {
  for (int64_t row = b.row_begin; row < b.row_end; row += MR) {
    const int64_t rows = std::min<int64_t>(MR, b.row_end - row);
    if (b.bits == 4) {
      tile_rows<V, 4, MR>(b, row, rows);
    } else {
      tile_rows<V, 8, MR>(b, row, rows);
    }
  }
}

}  // namespace quant
}  // namespace llmfast
