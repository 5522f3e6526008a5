// Paged attention on CUDA, the launcher: checks the inputs, sizes the grid (rows per CTA, splits of the
// keys) and launches the kernels of paged_kernels.cuh, which describes how they work.
#include <algorithm>
#include <cstdint>
#include <optional>

#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "paged_kernels.cuh"

namespace llmfast {
namespace {

using namespace cuda_paged;

constexpr int kReduceThreads = 128;  // 4 warps per reduce CTA; not yet tuned on the H100
constexpr int kMinSplitKeys = 128;   // a split shorter than this costs more in the reduce than it saves
constexpr int kMaxSplits = 64;

// Splits of each context so that CTAs x splits fill the GPU's SMs; 1 (a single pass, no reduce) when the
// other grid dimensions already do. From shapes only (max_keys bounds every context), so a decode step
// can be captured in a CUDA graph.
int choose_splits(int64_t ctas, int64_t max_keys, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (ctas >= sms) {
    return 1;
  }
  const int64_t fill = (sms + ctas - 1) / ctas;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({fill, max_keys / kMinSplitKeys, kMaxSplits})));
}

// Rows per attention CTA: kWideRows for a group of more than kNarrowRows heads, so one CTA reads the
// group's K/V, where the device lets a CTA have the shared memory (every sm_80 or later GPU; sm_75's
// 64 KB only up to head_dim 128); else kNarrowRows, the group then split over several CTAs.
int choose_rows(int group, int head_dim, int tile_keys, int device) {
  if (group <= kNarrowRows) {
    return kNarrowRows;
  }
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t wide = attention_smem(kWideRows, head_dim, tile_keys) + sizeof(RowState<kWideRows>);
  return wide <= static_cast<size_t>(optin) ? kWideRows : kNarrowRows;
}

at::Tensor paged_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens,
                                const std::optional<at::Tensor>& cu_seqlens_q, double softmax_scale) {
  constexpr const char* op = "paged_attention_cuda";
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.is_contiguous(), op,
              ": q must be a contiguous CUDA (total_q, heads, head_dim) tensor, got ", q.sizes());
  check_caches(op, k_cache, v_cache, q);
  const int heads = static_cast<int>(q.size(1));
  const int head_dim = static_cast<int>(q.size(2));
  const int kv_heads = static_cast<int>(k_cache.size(2));
  TORCH_CHECK(k_cache.size(3) == head_dim && head_dim <= kMaxHeadDim, op, ": head_dim must match q and be <= ",
              kMaxHeadDim, ", got ", k_cache.sizes());
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, op, ": q's heads (", heads,
              ") must be a multiple of the caches' kv_heads (", kv_heads, ")");
  for (const at::Tensor* t : {&block_tables, &context_lens}) {
    TORCH_CHECK(t->device() == q.device() && t->scalar_type() == at::kInt && t->is_contiguous(), op,
                ": block_tables and context_lens must be contiguous int32 tensors on q's device");
  }
  TORCH_CHECK(block_tables.dim() == 2 && context_lens.dim() == 1 && context_lens.size(0) == block_tables.size(0),
              op, ": expected block_tables (num_seqs, max_blocks) and context_lens (num_seqs,)");
  const int64_t num_seqs = block_tables.size(0);
  const bool decode = !cu_seqlens_q.has_value();
  if (decode) {
    TORCH_CHECK(q.size(0) == num_seqs, op, ": decode needs one query per sequence, got q ", q.sizes());
  } else {
    TORCH_CHECK(cu_seqlens_q->device() == q.device() && cu_seqlens_q->scalar_type() == at::kInt &&
                    cu_seqlens_q->is_contiguous() && cu_seqlens_q->dim() == 1 &&
                    cu_seqlens_q->size(0) == num_seqs + 1,
                op, ": cu_seqlens_q must be a contiguous int32 (num_seqs + 1,) tensor on q's device");
  }

  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  at::Tensor out = at::empty_like(q);
  const int64_t total_q = q.size(0);
  if (total_q == 0 || num_seqs == 0) {
    return out;
  }
  AttentionParams p{};
  p.block_tables = block_tables.const_data_ptr<int>();
  p.context_lens = context_lens.const_data_ptr<int>();
  p.cu_seqlens_q = decode ? nullptr : cu_seqlens_q->const_data_ptr<int>();
  p.layout = cache_layout(k_cache);
  p.num_seqs = static_cast<int>(num_seqs);
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.max_blocks = static_cast<int>(block_tables.size(1));
  p.group = heads / kv_heads;
  p.tile_keys = head_dim <= 128 ? kMaxTileKeys : kMaxTileKeys / 2;  // a K or V tile of at most 16.5 KB
  const int rows = choose_rows(p.group, head_dim, p.tile_keys, q.get_device());
  const int head_chunks = (p.group + rows - 1) / rows;
  // even chunks, so that the last is not mostly padding: 71 heads as 36 + 35, not 64 + 7
  p.heads_per_cta = (p.group + head_chunks - 1) / head_chunks;
  p.tokens_per_tile = decode ? 1 : rows / p.heads_per_cta;
  p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;
  // every sequence's tiles, bounded without reading cu_seqlens_q: sum ceil(n_i / t) <= total_q / t + num_seqs
  const int64_t tiles = decode ? num_seqs : total_q / p.tokens_per_tile + num_seqs;
  p.num_splits = choose_splits(tiles * kv_heads * head_chunks, block_tables.size(1) * k_cache.size(1),
                               q.get_device());
  at::Tensor part_acc, part_max, part_sum;
  if (p.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    part_acc = at::empty({total_q, heads, p.num_splits, head_dim}, f32);
    part_max = at::empty({total_q, heads, p.num_splits}, f32);
    part_sum = at::empty({total_q, heads, p.num_splits}, f32);
    p.part_acc = part_acc.mutable_data_ptr<float>();
    p.part_max = part_max.mutable_data_ptr<float>();
    p.part_sum = part_sum.mutable_data_ptr<float>();
  }
  TORCH_CHECK(tiles * p.num_splits <= INT32_MAX && head_chunks <= 65535 && kv_heads <= 65535 &&
                  total_q * heads <= INT32_MAX, op, ": too many queries or heads, got q ", q.sizes());
  const dim3 grid(static_cast<unsigned>(tiles * p.num_splits), static_cast<unsigned>(kv_heads),
                  static_cast<unsigned>(head_chunks));
  const size_t smem = attention_smem(rows, head_dim, p.tile_keys);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(q.scalar_type(), "paged_attention_cuda", AT_WRAP([&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorized = cache_vectorizable(k_cache, kVec) && aligned(v_cache.const_data_ptr(), 16);
    auto launch = [&](auto kernel) {
      // past 48 KB of shared memory (static and dynamic) a kernel must opt in; choose_rows checked the device
      // allows it
      if (smem + sizeof(RowState<kWideRows>) > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
      }
      kernel<<<grid, attention_threads(rows), smem, stream>>>(
          q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(), v_cache.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), p);
    };
    if (rows == kWideRows && vectorized) {
      launch(paged_attention_kernel<scalar_t, kVec, kWideRows>);
    } else if (rows == kWideRows) {
      launch(paged_attention_kernel<scalar_t, 1, kWideRows>);
    } else if (vectorized) {
      launch(paged_attention_kernel<scalar_t, kVec, kNarrowRows>);
    } else {
      launch(paged_attention_kernel<scalar_t, 1, kNarrowRows>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.num_splits > 1) {
      paged_attention_reduce_kernel<scalar_t><<<static_cast<unsigned>(total_q * heads), kReduceThreads, 0, stream>>>(
          p.part_acc, p.part_max, p.part_sum, out.mutable_data_ptr<scalar_t>(), p.num_splits, head_dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmfast, m) {
  // Same contract as paged_attention_cpu (see csrc/ops.cpp), for CUDA tensors.
  m.def("paged_attention_cuda(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables,"
        " Tensor context_lens, Tensor? cu_seqlens_q, float softmax_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("paged_attention_cuda", &paged_attention_cuda);
}

}  // namespace llmfast