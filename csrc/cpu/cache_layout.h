// Cache checks shared by the CPU paged ops (kv_cache.cpp, paged.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace llmfast {

// The Python wrappers check all of this before calling; these checks keep a direct call of the ops, or a
// torch.compile'd graph (whose index values Python cannot read while tracing), from reading or writing
// out of bounds. Each is one pass over the index tensors, no more than the kernels read anyway.
// Both caches (of one shape, check_caches) are addressed with k_cache's strides: they must agree wherever
// the index can be nonzero (a size-1 dim, such as MQA's one kv head, is never stepped along, so its stride
// may differ).
inline bool same_layout(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  for (int64_t d = 0; d < k_cache.dim(); ++d) {
    const bool unit = d == k_cache.dim() - 1;
    if (k_cache.size(d) > 1 && (k_cache.stride(d) != v_cache.stride(d) || (unit && k_cache.stride(d) != 1))) {
      return false;
    }
  }
  return true;
}

inline void check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && v_cache.dtype() == k_cache.dtype(),
              op, ": k_cache and v_cache must be (num_blocks, block_size, kv_heads, head_dim) of one dtype");
  TORCH_CHECK(k_cache.size(1) > 0 && k_cache.size(2) > 0, op, ": block_size and kv_heads must be positive");
}

}  // namespace llmfast
