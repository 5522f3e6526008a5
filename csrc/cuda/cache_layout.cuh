// The paged KV cache as the CUDA kernels address it, and the launchers' checks of it (kv_cache.cu,
// paged.cu). Layout (num_blocks, block_size, kv_heads, head_dim), unit head_dim stride, k and v strided alike.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include "pack.cuh"

namespace llmfast {

struct CacheLayout {
  int64_t stride_block, stride_slot, stride_head;  // elements; same for k_cache and v_cache
  int block_size;
};

inline CacheLayout cache_layout(const at::Tensor& cache) {
  return CacheLayout{cache.stride(0), cache.stride(1), cache.stride(2), static_cast<int>(cache.size(1))};
}

// Whether 16-byte packs of kVec elements can address every (block, slot, head) row of the cache.
inline bool cache_vectorizable(const at::Tensor& cache, int kVec) {
  return cache.size(3) % kVec == 0 && cache.stride(0) % kVec == 0 && cache.stride(1) % kVec == 0 &&
         cache.stride(2) % kVec == 0 && aligned(cache.const_data_ptr(), 16);
}

inline void check_cache(const char* op, const char* name, const at::Tensor& cache, const at::Tensor& like) {
  TORCH_CHECK(cache.is_cuda() && cache.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              ", got ", cache.device());
  TORCH_CHECK(cache.dim() == 4, op, ": ", name, " must be (num_blocks, block_size, kv_heads, head_dim), got ",
              cache.sizes());
  TORCH_CHECK(cache.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", cache.scalar_type());
  // a size-1 head_dim may have any stride (torch calls such a tensor contiguous)
  TORCH_CHECK(cache.size(3) == 1 || cache.stride(3) == 1, op, ": ", name,
              " must have unit head_dim stride, got strides ", cache.strides());
  TORCH_CHECK(cache.size(1) > 0 && cache.size(2) > 0, op, ": ", name,
              " must have block_size and kv_heads above 0, got ", cache.sizes());
}

// Both caches checked against `like`, and against each other: the kernels address them with one layout.
inline void check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& like) {
  check_cache(op, "k_cache", k_cache, like);
  check_cache(op, "v_cache", v_cache, like);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(), op,
              ": k_cache and v_cache must have the same shape and strides");
}

}  // namespace llmfast
