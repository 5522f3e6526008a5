// Paged attention on CUDA: queries attend over a paged KV cache (cache_layout.cuh). One thread block
// (CTA) per (query tile, split of the keys, kv head, chunk of the group's query heads). A CTA's rows are
// (query token, query head) pairs of one kv head, so each K/V tile is read from memory once, with 16-byte
// loads, for every query head of the group (of up to 64 heads: kWideRows).
// A decode tile is one token (rows = the group's heads); a prefill tile is several tokens of one sequence.
// Long contexts are split across CTAs (flash-decoding) when the other grid dimensions do not fill the GPU;
// the splits' partial softmaxes are merged by a reduce kernel. Math in fp32 on CUDA cores: decode is
// bandwidth-bound, and the Triton kernel (preferred by "auto") covers chunked prefill with tensor cores.
// paged.cu checks the inputs, sizes the grid (rows per CTA, splits of the keys) and launches these kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cache_layout.cuh"

namespace llmfast {
namespace cuda_paged {

constexpr int kMaxHeadDim = 256;     // as llmfast.ops.attention.MAX_HEAD_DIM
constexpr int kMaxTileKeys = 32;     // keys per shared-memory tile (16 at head_dim > 128)
// Query rows (token, head) per attention CTA. 16 rows serve groups of up to 16 heads (and prefill tiles
// of several tokens); 64 rows let one CTA take a whole MQA/GQA group of 17-64 heads, so its K/V are read
// once rather than once per 16 heads. 64 is the most that fits well at head_dim 256: 86 KB of shared
// memory (64 KB of it the fp32 q rows) fit sm_80 (163 KB) and sm_86/sm_89 (99 KB) and leave two CTAs per
// sm_90 SM, where 128 rows would take 156 KB and 128 accumulators a thread. A larger group (Falcon-7B's
// 71) is split over ceil(group / 64) CTAs, each of which reads the K/V again.
constexpr int kNarrowRows = 16;
constexpr int kWideRows = 64;
// finite running-max start: exp2f(-inf - kNoScore) is 0, not NaN; the lowest float, so that a row whose
// every score is finite but below -1e30 still weighs its keys
constexpr float kNoScore = -3.40282347e+38f;
constexpr float kLog2e = 1.4426950408889634f;

// Threads of an attention CTA of `rows` rows: each holds rows * kMaxHeadDim / threads P @ V outputs in
// registers, 32 at 16 rows and 64 at 64 rows.
constexpr int attention_threads(int rows) {
  return rows <= kNarrowRows ? 128 : 256;
}

// CTAs an SM must be able to hold (__launch_bounds__): as many as shared memory allows an sm_90 SM at
// head_dim 256 (34 KB and 86 KB a CTA), capping registers at 80 and 128 a thread. Left to itself, ptxas
// (CUDA 13.0, sm_90a) used fewer and spilled the 64-row kernel's accumulators inside the key loop.
constexpr int attention_min_ctas(int rows) {
  return rows <= kNarrowRows ? 6 : 2;
}

struct AttentionParams {
  const int* block_tables;  // (num_seqs, max_blocks)
  const int* context_lens;  // (num_seqs,)
  const int* cu_seqlens_q;  // (num_seqs + 1,), or null: decode, one query per sequence
  float* part_acc;          // (total_q, heads, splits, head_dim): unnormalised partial outputs
  float* part_max;          // (total_q, heads, splits), log2 domain
  float* part_sum;          // (total_q, heads, splits)
  CacheLayout layout;
  int num_seqs, heads, kv_heads, head_dim, max_blocks;
  int group;            // query heads per kv head
  int heads_per_cta;    // the group, or an even share of a group larger than a CTA's rows
  int tokens_per_tile;  // 1 for decode; the CTA's rows / heads_per_cta for prefill
  int num_splits, tile_keys;
  float scale_log2;     // softmax_scale * log2(e): scores go through exp2f
};

// Which sequence and which of its query tiles CTA column `tile` handles; false: past the last tile.
// Prefill tiles are numbered sequence after sequence; the grid covers an upper bound of their count,
// so the launcher needs no host copy of cu_seqlens_q.
inline __device__ bool find_tile(const AttentionParams& p, int64_t tile, int& seq, int& first_token, int& n_q,
                          int64_t& q_start) {
  if (p.cu_seqlens_q == nullptr) {
    seq = static_cast<int>(tile);
    first_token = 0;
    n_q = 1;
    q_start = tile;
    return tile < p.num_seqs;
  }
  int64_t base = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int start = p.cu_seqlens_q[s];
    const int n = p.cu_seqlens_q[s + 1] - start;
    const int tiles = (n + p.tokens_per_tile - 1) / p.tokens_per_tile;
    if (tile < base + tiles) {
      seq = s;
      first_token = static_cast<int>(tile - base) * p.tokens_per_tile;
      n_q = n;
      q_start = start;
      return true;
    }
    base += tiles;
  }
  return false;
}

// Per-row state of an attention CTA, in static shared memory (the launcher counts sizeof of it against
// the device's limit, beside the dynamic part: attention_smem).
template <int kRows>
struct RowState {
  float m[kRows], l[kRows], alpha[kRows];  // running max (log2 domain) and sum; this tile's rescale
  int64_t q[kRows];                        // global query row, -1 when the row is padding
  int head[kRows], pos[kRows];             // query head; the query's position in its context
};

// Dynamic shared memory of an attention CTA: q rows and one K or V tile, both widened to fp32 (tile
// rows padded to head_dim + 1 floats, so threads reading one column of consecutive keys hit distinct
// banks), and the tile's scores.
inline size_t attention_smem(int rows, int head_dim, int tile_keys) {
  return sizeof(float) * (rows * head_dim + tile_keys * (head_dim + 1) + rows * tile_keys);
}

// Grid (query tiles bound * num_splits, kv_heads, head chunks). q, out: (total_q, heads, head_dim).
template <typename T, int kVec, int kRows>
__global__ void __launch_bounds__(attention_threads(kRows), attention_min_ctas(kRows))
    paged_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                           T* __restrict__ out, AttentionParams p) {
  using VecT = Pack<T, kVec>;
  constexpr int kCtaThreads = attention_threads(kRows);
  constexpr int kAcc = kRows * kMaxHeadDim / kCtaThreads;  // output elements each thread accumulates
  static_assert(kCtaThreads >= kRows, "one thread per row runs the online softmax");
  extern __shared__ float smem[];
  const int D = p.head_dim;
  const int kv_stride = D + 1;
  float* q_s = smem;                              // (kRows, D)
  float* kv_s = q_s + kRows * D;                // (tile_keys, D + 1)
  float* s_s = kv_s + p.tile_keys * kv_stride;  // (kRows, tile_keys): scores, then probabilities
  __shared__ RowState<kRows> rows;

  const int split = blockIdx.x % p.num_splits;
  int seq, first_token, n_q;
  int64_t q_start;
  if (!find_tile(p, blockIdx.x / p.num_splits, seq, first_token, n_q, q_start)) {
    return;
  }
  const int kv_head = blockIdx.y;
  const int head_begin = blockIdx.z * p.heads_per_cta;  // within the group
  const int context = p.context_lens[seq];
  const int tile_tokens = min(p.tokens_per_tile, n_q - first_token);

  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    const int token = first_token + r / p.heads_per_cta;
    const int h = head_begin + r % p.heads_per_cta;
    const bool valid = r < p.tokens_per_tile * p.heads_per_cta && token < n_q && h < p.group;
    rows.q[r] = valid ? q_start + token : -1;
    rows.head[r] = kv_head * p.group + h;
    rows.pos[r] = context - n_q + token;  // queries are the last tokens of the context
    rows.m[r] = kNoScore;
    rows.l[r] = 0.f;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kRows * D; i += blockDim.x) {
    const int r = i / D;
    q_s[i] = rows.q[r] < 0 ? 0.f : static_cast<float>(q[(rows.q[r] * p.heads + rows.head[r]) * D + i % D]);
  }

  // keys the tile's last query sees, then this split's share of them in whole tiles
  const int kv_end = context - n_q + first_token + tile_tokens;
  const int per_split = (kv_end + p.num_splits - 1) / p.num_splits;
  const int split_len = (per_split + p.tile_keys - 1) / p.tile_keys * p.tile_keys;
  const int kv_lo = split * split_len;
  const int kv_hi = min(kv_lo + split_len, kv_end);

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;

  const int n_vec = D / kVec;
  const int* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks;
  auto load_tile = [&](const T* cache, int start, int keys) {
    for (int i = threadIdx.x; i < keys * n_vec; i += blockDim.x) {
      const int j = i / n_vec;
      const int d = (i % n_vec) * kVec;
      const int pos = start + j;
      const int64_t block = table[pos / p.layout.block_size];
      const VecT x = *reinterpret_cast<const VecT*>(cache + block * p.layout.stride_block +
                                                     (pos % p.layout.block_size) * p.layout.stride_slot +
                                                     kv_head * p.layout.stride_head + d);
#pragma unroll
      for (int e = 0; e < kVec; ++e) kv_s[j * kv_stride + d + e] = static_cast<float>(x.v[e]);
    }
  };

  for (int start = kv_lo; start < kv_hi; start += p.tile_keys) {
    const int keys = min(p.tile_keys, kv_hi - start);
    __syncthreads();  // the previous tile's V is no longer read
    load_tile(k_cache, start, keys);
    __syncthreads();
    // scores: consecutive threads take consecutive keys of one row (K column reads hit distinct banks)
    for (int i = threadIdx.x; i < kRows * p.tile_keys; i += blockDim.x) {
      const int r = i / p.tile_keys;
      const int j = i % p.tile_keys;
      float score = -INFINITY;  // padding rows, keys past the tile, keys after the row's query
      if (rows.q[r] >= 0 && j < keys && start + j <= rows.pos[r]) {
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += q_s[r * D + d] * kv_s[j * kv_stride + d];
        score = dot * p.scale_log2;
      }
      s_s[i] = score;
    }
    __syncthreads();
    load_tile(v_cache, start, keys);  // only rows j < keys: unused slots (maybe NaN) are never read
    // online softmax, one thread per row
    if (threadIdx.x < kRows) {
      const int r = threadIdx.x;
      float m_new = rows.m[r];
      for (int j = 0; j < keys; ++j) m_new = fmaxf(m_new, s_s[r * p.tile_keys + j]);
      float sum = 0.f;
      for (int j = 0; j < keys; ++j) {
        const float prob = exp2f(s_s[r * p.tile_keys + j] - m_new);
        s_s[r * p.tile_keys + j] = prob;
        sum += prob;
      }
      rows.alpha[r] = exp2f(rows.m[r] - m_new);
      rows.l[r] = rows.l[r] * rows.alpha[r] + sum;
      rows.m[r] = m_new;
    }
    __syncthreads();
    // P @ V: thread t owns output elements t, t + kCtaThreads, ... of the (kRows, D) tile; padding rows
    // (most of a 64-row decode CTA for a group of 17) are skipped
#pragma unroll
    for (int a = 0; a < kAcc; ++a) {
      const int i = threadIdx.x + a * kCtaThreads;
      if (i < kRows * D && rows.q[i / D] >= 0) {
        const int r = i / D;
        const int d = i % D;
        float pv = 0.f;
        for (int j = 0; j < keys; ++j) pv += s_s[r * p.tile_keys + j] * kv_s[j * kv_stride + d];
        acc[a] = acc[a] * rows.alpha[r] + pv;
      }
    }
  }

#pragma unroll
  for (int a = 0; a < kAcc; ++a) {
    const int i = threadIdx.x + a * kCtaThreads;
    if (i < kRows * D && rows.q[i / D] >= 0) {
      const int r = i / D;
      const int64_t row = rows.q[r] * p.heads + rows.head[r];
      if (p.num_splits == 1) {
        const float l = rows.l[r];
        out[row * D + i % D] = static_cast<T>(l > 0.f ? acc[a] / l : 0.f);  // no key seen: 0
      } else {
        p.part_acc[(row * p.num_splits + split) * D + i % D] = acc[a];
      }
    }
  }
  if (p.num_splits > 1 && threadIdx.x < kRows && rows.q[threadIdx.x] >= 0) {
    const int r = threadIdx.x;
    const int64_t part = (rows.q[r] * p.heads + rows.head[r]) * p.num_splits + split;
    p.part_max[part] = rows.m[r];
    p.part_sum[part] = rows.l[r];
  }
}

// One CTA per (query token, head): merges the splits' partial softmaxes into the output row.
template <typename T>
__global__ void paged_attention_reduce_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_max,
                                              const float* __restrict__ part_sum, T* __restrict__ out,
                                              int num_splits, int head_dim) {
  const int64_t row = blockIdx.x;  // token * heads + head
  const float* m = part_max + row * num_splits;
  const float* l = part_sum + row * num_splits;
  float m_max = kNoScore;
  for (int s = 0; s < num_splits; ++s) m_max = fmaxf(m_max, m[s]);
  float total = 0.f;
  for (int s = 0; s < num_splits; ++s) total += l[s] * exp2f(m[s] - m_max);  // empty splits: l = 0
  const float inv = total > 0.f ? 1.f / total : 0.f;  // no key at all: 0
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) o += part_acc[(row * num_splits + s) * head_dim + d] * exp2f(m[s] - m_max);
    out[row * head_dim + d] = static_cast<T>(o * inv);
  }
}

}  // namespace cuda_paged
}  // namespace llmfast
