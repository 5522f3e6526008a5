// 16-byte vector access, shared by the CUDA kernels (norm.cu, kv_cache.cu, paged.cu).
#pragma once

#include <cstddef>
#include <cstdint>

namespace llmfast {

// kVec elements loaded or stored as one 16-byte access (kVec = 1: the scalar fallback).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;  // null counts as aligned
}

}  // namespace llmfast
