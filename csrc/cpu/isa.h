// Which instruction-set copy of a CPU kernel to run: the widest this CPU has ("auto"), or the one named
// (the narrower ones are there to be tested on a CPU that has the wider ones). Shared by the kernels
// compiled several times under target attributes (quant_matmul.cpp, packed_linear.cpp, paged.cpp).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

namespace llmfast {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// `op` names the operator in the errors.
inline Isa pick_isa(c10::string_view name, const char* op) {
  if (name == "baseline") {
    return Isa::kBaseline;
  }
#if defined(__x86_64__)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  // and F16C, which paged.cpp's copy widens fp16 with (every AVX2 CPU so far has it)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (name == "avx512" || (name == "auto" && avx512)) {
    TORCH_CHECK(avx512, op, ": isa='avx512' needs AVX-512F and FMA, which this CPU lacks");
    return Isa::kAvx512;
  }
  if (name == "avx2" || (name == "auto" && avx2)) {
    TORCH_CHECK(avx2, op, ": isa='avx2' needs AVX2, FMA and F16C, which this CPU lacks");
    return Isa::kAvx2;
  }
#endif
  TORCH_CHECK(name == "auto", op, ": isa must be 'auto', 'avx512', 'avx2' or 'baseline' (on x86-64), got '", name,
              "'");
  return Isa::kBaseline;
}

}  // namespace llmfast
