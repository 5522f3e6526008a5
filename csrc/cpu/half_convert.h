// Conversions between float32 and float16 / bfloat16 that -O3 vectorises.
// c10's scalar conversions (used when ATen is not built per CPU capability, as in an extension) branch,
// which stops the vectoriser and made 16-bit rows 5-20x slower than float32 ones. These use integer
// operations and selects only, and give bit-identical results to c10: round to nearest even, NaN kept,
// overflow to infinity, subnormals exact. The float16 ones follow the FP16 library (Maratyszcza/FP16),
// as c10 does.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace llmfast {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline float to_float(float v) {
  return v;
}

inline float to_float(c10::BFloat16 v) {
  return bits_to_float(static_cast<uint32_t>(v.x) << 16);
}

inline float to_float(c10::Half v) {
  const uint32_t w = static_cast<uint32_t>(v.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // exponent and mantissa, sign shifted out
  // Normal numbers: move exponent and mantissa into place and rescale the exponent bias by 2^-112.
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: the mantissa as the low bits of 0.5f, minus 0.5f, is exact.
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t normalized_bits = float_to_bits(normalized);
  const uint32_t denormalized_bits = float_to_bits(denormalized);
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));  // all ones or zero
  return bits_to_float(sign | (denormalized_bits & is_subnormal) | (normalized_bits & ~is_subnormal));
}

template <typename scalar_t>
scalar_t from_float(float v);

template <>
inline float from_float<float>(float v) {
  return v;
}

template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <>
inline c10::Half from_float<c10::Half>(float v) {
  // Scaling up then down rounds values past the float16 range to infinity and leaves the rest exact.
  float base = (__builtin_fabsf(v) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(v);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;  // subnormal results share the smallest exponent
  // Adding a power of two that puts the float16 ulp at the float32 ulp makes the FPU round to nearest even.
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);  // all ones or zero
  const uint32_t half = (sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan);
  return c10::Half(static_cast<uint16_t>(half), c10::Half::from_bits());
}

// Whole float16 rows through the F16C conversion instructions, 8 values per instruction. The emulated
// conversions above vectorise only to SSE2 width (the build has no -march flag), which left float16
// rows 4-5x slower than float32 ones; x86-64 CPUs of the last decade have F16C, checked at run time.
#if defined(__x86_64__)
inline bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}

__attribute__((target("avx,f16c"))) inline void half_to_float_row(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < n; ++j) {
    dst[j] = to_float(src[j]);
  }
}

// Round to nearest even, as from_float<c10::Half>.
__attribute__((target("avx,f16c"))) inline void float_to_half_row(const float* src, c10::Half* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i packed = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), packed);
  }
  for (; j < n; ++j) {
    dst[j] = from_float<c10::Half>(src[j]);
  }
}
#else
inline bool cpu_has_f16c() {
  return false;
}
inline void half_to_float_row(const c10::Half*, float*, int64_t) {}
inline void float_to_half_row(const float*, c10::Half*, int64_t) {}
#endif

}  // namespace llmfast
