// Sixteen float lanes as a GCC vector type, and a vectorised exp over them, for CPU kernels compiled several
// times under target attributes (csrc/cpu/paged.cpp). tests/test_cpu_vec16.py checks exp16 against std::exp
// compiled for the baseline, AVX2 and AVX-512.
#pragma once

#include "simd.h"

#include <cstdint>
#include <cstring>

namespace llmfast {

// One AVX-512 register, two AVX2 ones or four SSE ones, as each copy of a kernel compiles it (simd.h).
using f32x16 = vec_t<16>;

constexpr f32x16 kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// exp of each lane, within 2 ulp of std::exp for x in [-87, 88] (below: exp(-87), ~1e-38, where a probability
// next to the row's maximum, exp(0) = 1, has no visible share anyway). exp(x) = 2^n * exp(r) with
// n = round(x / ln 2) and |r| <= ln(2) / 2, where a degree-7 Taylor polynomial is exact to 5e-9.
// One std::exp per score cost as much as the dot products.
inline __attribute__((always_inline)) f32x16 exp16(f32x16 x) {
  using i32x16 = Vec<16>::i;
  const f32x16 lo = f32x16{} - 87.f, hi = f32x16{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f32x16 half = x < 0.f ? f32x16{} - 0.5f : f32x16{} + 0.5f;
  const i32x16 n = __builtin_convertvector(x * 1.44269504088896341f + half, i32x16);  // rounded half away
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  const f32x16 r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;  // ln 2 in two parts: r stays exact
  f32x16 p = 1.f / 5040 + r * (1.f / 40320);
  p = 1.f / 720 + r * p;
  p = 1.f / 120 + r * p;
  p = 1.f / 24 + r * p;
  p = 1.f / 6 + r * p;
  p = 0.5f + r * p;
  p = 1.f + r * p;
  p = 1.f + r * p;
  const i32x16 bits = (n + 127) << 23;  // 2^n as a float
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace llmfast
