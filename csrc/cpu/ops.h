// C++ CPU ops of llmfast, registered as torch.ops.llmfast.<name> (schemas in csrc/ops.cpp).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace llmfast {

// Fused residual add + LayerNorm (is_rms false) or RMSNorm (is_rms true), forward.
// x: (M, N) contiguous float32/float16/bfloat16; residual: like x or None;
// weight, bias: (N,) contiguous float32 or None (meaning ones / zeros).
// Returns (y: (M, N) x.dtype, h: (M, N) x.dtype = x + residual rounded to x.dtype, or (0,) without residual).
std::tuple<at::Tensor, at::Tensor> add_norm_cpu(
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    bool is_rms);

// Weight-only quantized matmul: y = x @ dequantize(qweight, scales, zeros).T (+ bias), the formats of
// llmfast.quant.QuantizedWeight. x: (M, K) contiguous float32/float16/bfloat16; qweight: int8 (N, K)
// (8 bits, symmetric) or int32 (N, K / 8) (4 bits, asymmetric, packed as llmfast.quant.pack_int4);
// scales: (N, groups) in x.dtype; zeros: like scales for 4 bits, None for 8; bias: (N,) in x.dtype or None.
// isa: "auto" (the widest this CPU has), or "avx512", "avx2", "baseline" to run that copy of the kernels.
// Returns y: (M, N) in x.dtype.
at::Tensor quant_matmul_cpu(
    const at::Tensor& x,
    const at::Tensor& qweight,
    const at::Tensor& scales,
    const std::optional<at::Tensor>& zeros,
    const std::optional<at::Tensor>& bias,
    c10::string_view isa);

}  // namespace llmfast
