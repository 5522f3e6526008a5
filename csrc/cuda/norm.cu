// Fused residual add + LayerNorm / RMSNorm forward on CUDA: one thread block per row.
// Pass 1 computes h = x + residual (rounded to x.dtype, as the CPU op and the reference do), pass 2 the
// variance about the mean, pass 3 the output. Rows of up to kMaxCachedCols keep h in shared memory
// between passes; longer rows re-read it from global memory, where it mostly still sits in L2.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "../norm_checks.h"
#include "pack.cuh"

namespace llmfast {
namespace {

constexpr int kMaxCachedCols = 8192;  // 32 KB of fp32 shared memory, under the 48 KB default limit
constexpr int kMaxThreads = 1024;     // the hardware limit; not yet tuned on the H100
constexpr int kWarp = 32;

// Sum of v over the block, returned to every thread; blockDim.x must be a multiple of 32.
// scratch: 32 floats of shared memory.
__device__ float block_sum(float v, float* scratch) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  __syncthreads();  // a previous call may still be reading scratch
  if (lane == 0) {
    scratch[warp] = v;
  }
  __syncthreads();
  v = lane < blockDim.x / kWarp ? scratch[lane] : 0.f;
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// x, residual, y, h_out: (M, n) row-major, block b handles row b; residual and h_out both null or both
// set; weight, bias: (n,) or null. n % kVec == 0 and every pointer is aligned to its Pack.
// Thread t owns vectors t, t + blockDim.x, ... in every pass, so it only ever re-reads the h values it
// wrote itself (to h_out or the shared cache), and no barrier is needed between the passes for them.
// x and residual are not __restrict__: passes 2 and 3 re-read h through h_src, which is x or h_out, and
// __restrict__ would let the compiler load it through the read-only cache, which need not see this
// kernel's own writes to h_out.
template <typename scalar_t, int kVec, bool kCached>
__global__ void __launch_bounds__(kMaxThreads)
    add_norm_fwd_kernel(const scalar_t* x, const scalar_t* residual, const float* __restrict__ weight,
                        const float* __restrict__ bias, scalar_t* __restrict__ y, scalar_t* h_out, int n,
                        float eps, bool is_rms) {
  using VecT = Pack<scalar_t, kVec>;
  using VecF = Pack<float, kVec>;
  // (kVec, n / kVec) when kCached: element k of vector i at k * n_vec + i, so that a warp's 32
  // consecutive vectors touch 32 consecutive banks.
  extern __shared__ float row_cache[];
  __shared__ float scratch[kWarp];

  const int n_vec = n / kVec;
  const int64_t row_start = static_cast<int64_t>(blockIdx.x) * n;
  const VecT* x_row = reinterpret_cast<const VecT*>(x + row_start);
  const VecT* residual_row = residual ? reinterpret_cast<const VecT*>(residual + row_start) : nullptr;
  VecT* h_row = h_out ? reinterpret_cast<VecT*>(h_out + row_start) : nullptr;
  VecT* y_row = reinterpret_cast<VecT*>(y + row_start);
  const VecT* h_src = residual ? h_row : x_row;  // where passes 2 and 3 re-read h when not cached

  auto read_h = [&](int i, float (&h)[kVec]) {
    if constexpr (kCached) {
      for (int k = 0; k < kVec; ++k) h[k] = row_cache[k * n_vec + i];
    } else {
      const VecT v = h_src[i];
      for (int k = 0; k < kVec; ++k) h[k] = static_cast<float>(v.v[k]);
    }
  };

  // The mean is summed about the row's first h: a row far from zero then sums small differences
  // instead of large values whose rounding would shift every output (RMSNorm needs no mean).
  float pivot = 0.f;
  if (!is_rms) {
    const float x0 = static_cast<float>(x[row_start]);
    pivot = residual ? static_cast<float>(static_cast<scalar_t>(x0 + static_cast<float>(residual[row_start])))
                     : x0;
  }

  float sum = 0.f;
  for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
    const VecT xv = x_row[i];
    float h[kVec];
    if (residual) {
      const VecT rv = residual_row[i];
      VecT hv;
      for (int k = 0; k < kVec; ++k) {
        hv.v[k] = static_cast<scalar_t>(static_cast<float>(xv.v[k]) + static_cast<float>(rv.v[k]));
        h[k] = static_cast<float>(hv.v[k]);
      }
      h_row[i] = hv;
    } else {
      for (int k = 0; k < kVec; ++k) h[k] = static_cast<float>(xv.v[k]);
    }
    for (int k = 0; k < kVec; ++k) {
      if constexpr (kCached) row_cache[k * n_vec + i] = h[k];
      sum += h[k] - pivot;
    }
  }
  const float mean = is_rms ? 0.f : pivot + block_sum(sum, scratch) / n;

  // Two passes: the variance about the mean, not E[h^2] - mean^2, which cancels when |mean| >> std.
  float sq = 0.f;
  for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
    float h[kVec];
    read_h(i, h);
    for (int k = 0; k < kVec; ++k) {
      const float d = h[k] - mean;
      sq += d * d;
    }
  }
  const float rstd = 1.f / sqrtf(block_sum(sq, scratch) / n + eps);  // IEEE sqrt and division

  const VecF* weight_vec = reinterpret_cast<const VecF*>(weight);
  const VecF* bias_vec = reinterpret_cast<const VecF*>(bias);
  for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
    float h[kVec];
    read_h(i, h);
    VecF w, b;
    if (weight) w = weight_vec[i];
    if (bias) b = bias_vec[i];
    VecT out;
    for (int k = 0; k < kVec; ++k) {
      float v = (h[k] - mean) * rstd;
      if (weight) v *= w.v[k];
      if (bias) v += b.v[k];
      out.v[k] = static_cast<scalar_t>(v);
    }
    y_row[i] = out;
  }
}

template <typename scalar_t, int kVec>
void launch(const scalar_t* x, const scalar_t* residual, const float* weight, const float* bias, scalar_t* y,
            scalar_t* h_out, int64_t m, int n, float eps, bool is_rms, cudaStream_t stream) {
  const int n_vec = n / kVec;
  // One vector per thread while the row allows it, so that short rows do not idle most of a big block.
  const int threads = std::min(kMaxThreads, (n_vec + kWarp - 1) / kWarp * kWarp);
  if (n <= kMaxCachedCols) {
    add_norm_fwd_kernel<scalar_t, kVec, true><<<static_cast<unsigned>(m), threads, n * sizeof(float), stream>>>(
        x, residual, weight, bias, y, h_out, n, eps, is_rms);
  } else {
    add_norm_fwd_kernel<scalar_t, kVec, false><<<static_cast<unsigned>(m), threads, 0, stream>>>(
        x, residual, weight, bias, y, h_out, n, eps, is_rms);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> add_norm_cuda(
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    bool is_rms) {
  check_norm_inputs("add_norm_cuda", x, residual, weight, bias);
  TORCH_CHECK(x.is_cuda(), "add_norm_cuda: x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX, "add_norm_cuda: x is too large, got shape ",
              x.sizes());

  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor h = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t m = x.size(0);
  const int n = static_cast<int>(x.size(1));
  if (m == 0) {
    return {y, h};  // a launch with an empty grid is an error
  }
  const float* weight_ptr = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const float* bias_ptr = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(x.scalar_type(), "add_norm_cuda", AT_WRAP([&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* residual_ptr = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    scalar_t* h_ptr = residual ? h.mutable_data_ptr<scalar_t>() : nullptr;
    // Rows start 16-byte aligned only when n * elem_size is a multiple of 16; fp32 weight and bias
    // packs of kVec floats need kVec * 4 bytes.
    const bool vectorized = n % kVec == 0 && aligned(x_ptr, 16) && aligned(residual_ptr, 16) &&
                            aligned(y_ptr, 16) && aligned(h_ptr, 16) &&
                            aligned(weight_ptr, kVec * sizeof(float)) && aligned(bias_ptr, kVec * sizeof(float));
    if (vectorized) {
      launch<scalar_t, kVec>(x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, h_ptr, m, n,
                             static_cast<float>(eps), is_rms, stream);
    } else {
      launch<scalar_t, 1>(x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, h_ptr, m, n,
                          static_cast<float>(eps), is_rms, stream);
    }
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {y, h};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmfast, m) {
  // Same contract as add_norm_cpu (see csrc/ops.cpp), for CUDA tensors.
  m.def("add_norm_cuda(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool is_rms)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("add_norm_cuda", &add_norm_cuda);
}

}  // namespace llmfast
