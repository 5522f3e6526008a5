// GCC vector types of V float32 (or int32) lanes, and unaligned loads of them, for the CPU kernels compiled once
// per instruction set under target attributes (V = 16: one AVX-512 register, 8: AVX2, 4: SSE; quant_tile.h,
// packed_linear.cpp, the paged_*.h kernels). The helpers taking these types are always inlined into the kernel
// copies, so no call passes them across an instruction-set boundary; GCC's note that such calls would change
// the ABI is silenced for every file that includes this one.
#pragma once

#include <cstdint>
#include <cstring>

namespace llmfast {

#pragma GCC diagnostic ignored "-Wpsabi"

template <int V>
struct Vec {
  typedef float f __attribute__((vector_size(4 * V)));
  typedef int32_t i __attribute__((vector_size(4 * V)));
};
template <int V>
using vec_t = typename Vec<V>::f;

// A vector of type T from p, which need not be aligned.
template <typename T>
inline __attribute__((always_inline)) T load(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <int V>
inline __attribute__((always_inline)) vec_t<V> load_vec(const float* p) {
  return load<vec_t<V>>(p);
}

}  // namespace llmfast
