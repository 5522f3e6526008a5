// Layout checks shared by add_norm_cpu and add_norm_cuda. A safety net only: llmfast/ops/norm.py
// validates every input first, with messages in the user's terms.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace llmfast {

inline void check_norm_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                              const at::Tensor& x) {
  if (!t.has_value()) {
    return;
  }
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1) && t->is_contiguous(), op, ": ", name,
              " must be a contiguous (N,) tensor with N = ", x.size(1), ", got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on ", x.device());
}

// x: (M, N) contiguous, N > 0; residual: like x or None; weight, bias: (N,) float32 or None.
inline void check_norm_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.is_contiguous(), op,
              ": x must be a contiguous (M, N) tensor with N > 0, got shape ", x.sizes());
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous(), op,
                ": residual must be contiguous with the shape of x ", x.sizes(), ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device() == x.device(), op,
                ": residual must have the dtype and device of x");
  }
  check_norm_vector(op, "weight", weight, x);
  check_norm_vector(op, "bias", bias, x);
}

}  // namespace llmfast
