// C++ CPU ops of llmfast, registered as torch.ops.llmfast.<name> (schemas in csrc/ops.cpp).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

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

}  // namespace llmfast
