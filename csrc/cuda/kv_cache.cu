// write_kv_cache on CUDA: each new token's key and value copied into its cache slot (slot -1 skipped),
// with 16-byte accesses where the cache's strides and the pointers allow.
#include <cstdint>

#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "cache_layout.cuh"

namespace llmfast {
namespace {

constexpr int kThreads = 128;  // 4 warps per CTA; not yet tuned on the H100

// k, v: (tokens, kv_heads, head_dim) contiguous. One CTA per token; slot -1 is skipped.
template <typename T, int kVec>
__global__ void write_kv_cache_kernel(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                                      T* __restrict__ v_cache, const int64_t* __restrict__ slot_mapping,
                                      CacheLayout layout, int kv_heads, int head_dim) {
  using VecT = Pack<T, kVec>;
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) {
    return;
  }
  const int64_t block = slot / layout.block_size;
  const int64_t offset = slot % layout.block_size;
  const int n_vec = head_dim / kVec;
  for (int i = threadIdx.x; i < kv_heads * n_vec; i += blockDim.x) {
    const int head = i / n_vec;
    const int d = (i % n_vec) * kVec;
    const int64_t src = (token * kv_heads + head) * head_dim + d;
    const int64_t dst = block * layout.stride_block + offset * layout.stride_slot + head * layout.stride_head + d;
    *reinterpret_cast<VecT*>(k_cache + dst) = *reinterpret_cast<const VecT*>(k + src);
    *reinterpret_cast<VecT*>(v_cache + dst) = *reinterpret_cast<const VecT*>(v + src);
  }
}

void write_kv_cache_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& slot_mapping) {
  constexpr const char* op = "write_kv_cache_cuda";
  TORCH_CHECK(k.is_cuda() && k.dim() == 3 && k.is_contiguous(), op,
              ": k must be a contiguous CUDA (tokens, kv_heads, head_dim) tensor, got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes() && v.is_contiguous() && v.scalar_type() == k.scalar_type() &&
                  v.device() == k.device(), op, ": v must be contiguous and match k, got ", v.sizes());
  check_caches(op, k_cache, v_cache, k);
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), op,
              ": caches must have k's kv_heads and head_dim, got ", k_cache.sizes());
  TORCH_CHECK(slot_mapping.device() == k.device() && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous() && slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0),
              op, ": slot_mapping must be a contiguous int64 (tokens,) tensor on k's device");
  const int64_t tokens = k.size(0);
  if (tokens == 0) {
    return;  // a launch with an empty grid is an error
  }
  const c10::cuda::OptionalCUDAGuard device_guard(k.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const CacheLayout layout = cache_layout(k_cache);
  const int kv_heads = static_cast<int>(k.size(1));
  const int head_dim = static_cast<int>(k.size(2));
  AT_DISPATCH_V2(k.scalar_type(), "write_kv_cache_cuda", AT_WRAP([&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorized = cache_vectorizable(k_cache, kVec) && aligned(v_cache.const_data_ptr(), 16) &&
                            aligned(k.const_data_ptr(), 16) && aligned(v.const_data_ptr(), 16);
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
          k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), k_cache.mutable_data_ptr<scalar_t>(),
          v_cache.mutable_data_ptr<scalar_t>(), slot_mapping.const_data_ptr<int64_t>(), layout, kv_heads,
          head_dim);
    };
    if (vectorized) {
      launch(write_kv_cache_kernel<scalar_t, kVec>);
    } else {
      launch(write_kv_cache_kernel<scalar_t, 1>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }), at::kFloat, at::kHalf, at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmfast, m) {
  // Same contract as write_kv_cache_cpu (see csrc/ops.cpp), for CUDA tensors.
  m.def("write_kv_cache_cuda(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping)"
        " -> ()");
}

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("write_kv_cache_cuda", &write_kv_cache_cuda);
}

}  // namespace llmfast
