// write_kv_cache on CPU: each token's key and value copied to its cache slot (slot -1 skipped).
#include "ops.h"
#include "cache_layout.h"

#include <algorithm>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace llmfast {
namespace {

void check_write_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_caches("write_kv_cache_cpu", k_cache, v_cache);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_cache.size(2) &&
                  k.size(2) == k_cache.size(3) && k.dtype() == k_cache.dtype() && v.dtype() == k.dtype(),
              "write_kv_cache_cpu: k, v must be (tokens, kv_heads, head_dim) matching the caches");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == k.size(0),
              "write_kv_cache_cpu: slot_mapping must be int64 (tokens,)");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < num_slots, "write_kv_cache_cpu: slot_mapping[", t, "] = ",
                slots[t], " is outside [-1, ", num_slots, ")");
  }
}

}  // namespace

void write_kv_cache_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && slot_mapping.is_contiguous(),
              "write_kv_cache_cpu: k, v and slot_mapping must be contiguous");
  check_write_args(k, v, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(same_layout(k_cache, v_cache),
              "write_kv_cache_cpu: caches need unit head_dim stride and equal strides");
  const int64_t tokens = k.size(0), kv_heads = k.size(1), D = k.size(2), bs = k_cache.size(1);
  const int64_t s_block = k_cache.stride(0), s_slot = k_cache.stride(1), s_head = k_cache.stride(2);
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  AT_DISPATCH_V2(k.scalar_type(), "write_kv_cache_cpu", AT_WRAP([&] {
    const scalar_t* k_src = k.const_data_ptr<scalar_t>();
    const scalar_t* v_src = v.const_data_ptr<scalar_t>();
    scalar_t* k_dst = k_cache.mutable_data_ptr<scalar_t>();
    scalar_t* v_dst = v_cache.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kv_heads * D)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t slot = slots[t];
        if (slot < 0) {
          continue;  // padding token
        }
        const int64_t base = (slot / bs) * s_block + (slot % bs) * s_slot;
        for (int64_t h = 0; h < kv_heads; ++h) {
          std::copy_n(k_src + (t * kv_heads + h) * D, D, k_dst + base + h * s_head);
          std::copy_n(v_src + (t * kv_heads + h) * D, D, v_dst + base + h * s_head);
        }
      }
    });
  }), at::kHalf, at::kBFloat16, at::kFloat);
}

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("write_kv_cache_cpu", &write_kv_cache_cpu);
}

}  // namespace llmfast
