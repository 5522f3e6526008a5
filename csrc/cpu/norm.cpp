// Fused residual add + LayerNorm / RMSNorm forward on CPU.
// Rows run in parallel; each row is copied once into an fp32 buffer and then read by plain loops
// that -O3 vectorises for the baseline ISA (the build has no -march flag).
#include "ops.h"
#include "../norm_checks.h"
#include "half_convert.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace llmfast {
namespace {

// Partial sums kept in independent lanes: without -ffast-math the compiler may not reorder a single
// running sum, so it vectorises only this form. Every kBlock elements the lanes are folded into a
// double, so no float chain grows past kBlock / kLanes = 64 additions, even for 65536-wide rows.
constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 1024;

// Elements per parallel task (ATen's own GRAIN_SIZE): enough work that a task outweighs the cost of
// handing it out.
constexpr int64_t kGrainElements = 32768;

// sum over j of (v[j] - shift)^kPower, for kPower 1 or 2; v: (n,)
template <int kPower>
float row_sum(const float* v, float shift, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float acc[kLanes] = {};
    int64_t j = start;
    for (; j + kLanes <= end; j += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const float d = v[j + k] - shift;
        acc[k] += kPower == 1 ? d : d * d;
      }
    }
    for (int64_t k = 0; j + k < end; ++k) {
      const float d = v[j + k] - shift;
      acc[k] += kPower == 1 ? d : d * d;
    }
    for (int64_t k = 0; k < kLanes; ++k) {
      total += acc[k];
    }
  }
  return static_cast<float>(total);
}

// h_row = x + residual rounded to scalar_t (written to h_out) and widened back to fp32, or just x
// widened when there is no residual (residual and h_out null). All pointers: (n,)
template <typename scalar_t>
void load_row(float* h_row, const scalar_t* x, const scalar_t* residual, scalar_t* h_out, int64_t n) {
  if (residual == nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      h_row[j] = to_float(x[j]);
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    // The rounded sum is what the next layer's residual stream sees, so it is also what gets normalized.
    // It is rounded twice (the compiler shares the work) because copying one rounded 16-bit struct to
    // both outputs stops the vectoriser.
    const float h = to_float(x[j]) + to_float(residual[j]);
    h_out[j] = from_float<scalar_t>(h);
    h_row[j] = to_float(from_float<scalar_t>(h));
  }
}

// y = (h_row - shift) * rstd * weight + bias; weight and bias are compile-time present or absent so
// the loop body has no branches. All pointers: (n,)
template <bool kWeight, bool kBias, typename scalar_t>
void store_row(scalar_t* y, const float* h_row, const float* weight, const float* bias, float shift,
               float rstd, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = (h_row[j] - shift) * rstd;
    if constexpr (kWeight) {
      v *= weight[j];
    }
    if constexpr (kBias) {
      v += bias[j];
    }
    y[j] = from_float<scalar_t>(v);
  }
}

// load_row for float16 through whole-row F16C conversions; scratch: (n,)
void load_row_f16c(float* h_row, float* scratch, const c10::Half* x, const c10::Half* residual, c10::Half* h_out,
                   int64_t n) {
  half_to_float_row(x, h_row, n);
  if (residual == nullptr) {
    return;
  }
  half_to_float_row(residual, scratch, n);
  for (int64_t j = 0; j < n; ++j) {
    h_row[j] += scratch[j];
  }
  float_to_half_row(h_row, h_out, n);
  half_to_float_row(h_out, h_row, n);  // normalise the rounded h, as load_row does
}

template <typename scalar_t>
void store_row(scalar_t* y, const float* h_row, const float* weight, const float* bias, float shift,
               float rstd, int64_t n) {
  if (weight != nullptr && bias != nullptr) {
    store_row<true, true>(y, h_row, weight, bias, shift, rstd, n);
  } else if (weight != nullptr) {
    store_row<true, false>(y, h_row, weight, bias, shift, rstd, n);
  } else if (bias != nullptr) {
    store_row<false, true>(y, h_row, weight, bias, shift, rstd, n);
  } else {
    store_row<false, false>(y, h_row, weight, bias, shift, rstd, n);
  }
}

// x, residual, h_out, y: (m, n), row-major; residual and h_out both null or both set;
// weight, bias: (n,) or null.
template <typename scalar_t>
void add_norm_rows(const scalar_t* x, const scalar_t* residual, const float* weight, const float* bias,
                   scalar_t* y, scalar_t* h_out, int64_t m, int64_t n, float eps, bool is_rms) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
  constexpr bool kHalf = std::is_same_v<scalar_t, c10::Half>;
  const bool f16c = kHalf && cpu_has_f16c();
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> h_row(n);  // one per task, reused across its rows
    std::vector<float> scratch(f16c ? n : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t offset = i * n;
      if constexpr (kHalf) {
        if (f16c) {
          load_row_f16c(h_row.data(), scratch.data(), x + offset, residual ? residual + offset : nullptr,
                        h_out ? h_out + offset : nullptr, n);
        }
      }
      if (!f16c) {
        load_row(h_row.data(), x + offset, residual ? residual + offset : nullptr,
                 h_out ? h_out + offset : nullptr, n);
      }
      // The mean is summed about the row's first element: a row far from zero then sums small
      // differences instead of large values whose rounding would shift every output.
      const float pivot = h_row[0];
      const float mean =
          is_rms ? 0.f : pivot + row_sum<1>(h_row.data(), pivot, n) / static_cast<float>(n);
      // A second pass for the variance about the mean, not E[h^2] - mean^2, which cancels when
      // |mean| >> std. RMSNorm's "variance" is the mean square (mean = 0).
      const float var = row_sum<2>(h_row.data(), mean, n) / static_cast<float>(n);
      const float rstd = 1.f / std::sqrt(var + eps);
      if constexpr (kHalf) {
        if (f16c) {
          store_row(scratch.data(), h_row.data(), weight, bias, mean, rstd, n);
          float_to_half_row(scratch.data(), y + offset, n);
          continue;
        }
      }
      store_row(y + offset, h_row.data(), weight, bias, mean, rstd, n);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_norm_cpu(
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    bool is_rms) {
  check_norm_inputs("add_norm_cpu", x, residual, weight, bias);
  TORCH_CHECK(x.device().is_cpu(), "add_norm_cpu: x must be a CPU tensor, got one on ", x.device());

  at::Tensor y = at::empty_like(x);
  at::Tensor h = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  const float* weight_ptr = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const float* bias_ptr = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_V2(x.scalar_type(), "add_norm_cpu", AT_WRAP([&] {
    add_norm_rows<scalar_t>(x.const_data_ptr<scalar_t>(),
                            residual ? residual->const_data_ptr<scalar_t>() : nullptr, weight_ptr, bias_ptr,
                            y.mutable_data_ptr<scalar_t>(), residual ? h.mutable_data_ptr<scalar_t>() : nullptr,
                            x.size(0), x.size(1), static_cast<float>(eps), is_rms);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {y, h};
}

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("add_norm_cpu", &add_norm_cpu);
}

}  // namespace llmfast
