// Weight-only quantized matmul on CPU: y (M, N) = x (M, K) @ dequantize(qweight).T (+ bias), the formats
// of llmfast/quant/weight.py (int8 symmetric; int4 asymmetric, 8 codes per int32 along K).
//
// Output columns run in parallel, kCols at a time. For each tile of up to MR rows (8 with AVX-512, 4
// otherwise) the kernel dequantizes the block's weights into vector registers (never to memory) and
// multiply-accumulates them with x in float32 lanes, so the weights are read from memory once per
// panel of rows (all of M up to kPanelBytes of x) and dequantized once per tile.
//
// The build has no -march flag (the wheel must run on any x86-64), so the kernels are compiled three
// times under target attributes (AVX-512, AVX2 + FMA, the baseline) and the widest one this CPU has
// is picked at run time. They are written with GCC vector extensions, so one source serves all three.
#include "ops.h"
#include "half_convert.h"
#include "isa.h"
#include "quant_tile.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace llmfast {
namespace {

// Rows of x per panel: a panel of float32 rows this large stays in L2 while every column streams past
// it. Larger batches re-read the weights once per panel.
constexpr int64_t kPanelBytes = 512 * 1024;

// Multiply-adds per parallel task, so that small problems stay on one thread.
constexpr int64_t kGrainMacs = 1 << 17;

using quant::Block;
using quant::block_rows;
using quant::kCols;
using quant::kOneGroup;

// One copy of the kernels per instruction set: V float32 lanes per vector, MR rows per tile (as many
// as the vector registers hold).
#if defined(__x86_64__)
__attribute__((target("avx512f,fma"))) void block_avx512(const Block& b) {
  block_rows<16, 8>(b);
}

__attribute__((target("avx2,fma"))) void block_avx2(const Block& b) {
  block_rows<8, 4>(b);
}
#endif

void block_baseline(const Block& b) {
  block_rows<4, 4>(b);
}

struct Kernels {
  void (*block)(const Block&);
  int lanes;
};

Kernels kernels_for(c10::string_view isa) {
  switch (pick_isa(isa, "quant_matmul_cpu")) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return {block_avx512, 16};
    case Isa::kAvx2:
      return {block_avx2, 8};
#endif
    default:
      return {block_baseline, 4};
  }
}

// x (rows, k) -> float32 xp (rows, k) in the order tile reads: within each whole chunk of
// codes_per_word * lanes values, vector j (lanes values) holds the chunk's values codes_per_word * l + j,
// l = 0 .. lanes - 1; the values past the last whole chunk stay in order.
template <typename scalar_t>
void prepare_x(const scalar_t* x, float* xp, int64_t rows, int64_t k, int64_t lanes, int64_t codes_per_word) {
  const int64_t chunk = codes_per_word * lanes;
  const int64_t whole = k / chunk * chunk;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = x + r * k;
      float* dst = xp + r * k;
      for (int64_t c = 0; c < whole; c += chunk) {
        for (int64_t j = 0; j < codes_per_word; ++j) {
          for (int64_t l = 0; l < lanes; ++l) {
            dst[c + j * lanes + l] = to_float(src[c + codes_per_word * l + j]);
          }
        }
      }
      for (int64_t i = whole; i < k; ++i) {
        dst[i] = to_float(src[i]);
      }
    }
  });
}

// Block's float32 scales and zeros, (cols, stride), for columns [n, n + cols): int4's zero becomes the
// value of code 0, since w = (code - 8) * scale + zero = code * scale + (zero - 8 * scale).
template <typename scalar_t>
void prepare_scales(const scalar_t* scales, const scalar_t* zeros, int64_t n, int cols, int64_t groups,
                    int64_t stride, float* scales_out, float* zeros_out) {
  for (int c = 0; c < cols; ++c) {
    const scalar_t* s = scales + (n + c) * groups;
    const scalar_t* z = zeros ? zeros + (n + c) * groups : nullptr;
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = to_float(s[g]);
      scales_out[c * stride + g] = scale;
      if (z != nullptr) {
        zeros_out[c * stride + g] = to_float(z[g]) - 8.f * scale;
      }
    }
  }
}

template <typename scalar_t>
void quant_matmul_rows(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                       const Kernels& kernels, at::Tensor& y) {
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0), groups = scales.size(1);
  const int bits = qweight.scalar_type() == at::kChar ? 8 : 4;

  at::Tensor xp = at::empty({m, k}, x.options().dtype(at::kFloat));
  prepare_x(x.const_data_ptr<scalar_t>(), xp.mutable_data_ptr<float>(), m, k, kernels.lanes, 32 / bits);
  // float32 results, written straight into y when y is float32
  at::Tensor yf = y.scalar_type() == at::kFloat ? y : at::empty({m, n}, y.options().dtype(at::kFloat));
  std::vector<float> bias_f;
  if (bias.has_value()) {
    const scalar_t* b = bias->const_data_ptr<scalar_t>();
    bias_f.assign(b, b + n);  // converts each element
  }

  const int64_t group_size = k / groups;  // a power of two when groups > 1 (llmfast.quant.GROUP_SIZES)
  const int group_shift = groups == 1 ? kOneGroup : __builtin_ctzll(group_size);
  // tile loads a vector of scales from a chunk's first group, so rows are padded by one vector
  const int64_t scales_stride = groups + kernels.lanes;
  const int64_t panel_rows = std::max<int64_t>(1, kPanelBytes / (4 * k));
  const int64_t blocks = (n + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / (kCols * k * std::min(m, panel_rows)));
  const scalar_t* scales_ptr = scales.const_data_ptr<scalar_t>();
  const scalar_t* zeros_ptr = zeros.has_value() ? zeros->const_data_ptr<scalar_t>() : nullptr;
  const char* qweight_ptr = static_cast<const char*>(qweight.const_data_ptr());
  const int64_t qweight_row_bytes = qweight.size(1) * qweight.element_size();
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scales_f(kCols * scales_stride), zeros_f(kCols * scales_stride);
    Block b{};
    b.x = xp.const_data_ptr<float>();
    b.k = k;
    b.scales = scales_f.data();
    b.zeros = zeros_f.data();
    b.group_shift = group_shift;
    for (int l = 0; l < kernels.lanes; ++l) {
      // lane l holds codes of word l; 0 in every lane when a group spans the chunk
      b.lane_group[l] = groups == 1 ? 0 : static_cast<int32_t>(l / (group_size / (32 / bits)));
    }
    b.bits = bits;
    b.y_stride = n;
    for (int64_t row = 0; row < m; row += panel_rows) {
      b.row_begin = row;
      b.row_end = std::min(m, row + panel_rows);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t col = block * kCols;
        b.cols = static_cast<int>(std::min<int64_t>(kCols, n - col));
        prepare_scales(scales_ptr, zeros_ptr, col, b.cols, groups, scales_stride, scales_f.data(), zeros_f.data());
        b.qweight = qweight_ptr + col * qweight_row_bytes;
        b.qweight_stride = b.cols == kCols ? qweight_row_bytes : 0;
        b.prefetch_distance = kCols * qweight_row_bytes;
        b.scales_stride = b.cols == kCols ? scales_stride : 0;
        b.y = yf.mutable_data_ptr<float>() + col;
        b.bias = bias_f.empty() ? nullptr : bias_f.data() + col;
        kernels.block(b);
      }
    }
  });

  if (y.scalar_type() != at::kFloat) {
    const float* src = yf.const_data_ptr<float>();
    scalar_t* dst = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, m * n, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = from_float<scalar_t>(src[i]);
      }
    });
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "quant_matmul_cpu: x must be a contiguous (M, K) CPU tensor, got shape ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "quant_matmul_cpu: x must be float32/float16/bfloat16, got ", x.scalar_type());
  const bool int8 = qweight.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || qweight.scalar_type() == at::kInt,
              "quant_matmul_cpu: qweight must be int8 (8 bits) or int32 (4 bits packed), got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.device() == x.device(),
              "quant_matmul_cpu: qweight must be a contiguous 2-D tensor on ", x.device());
  const int64_t k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(k > 0, "quant_matmul_cpu: K (x.size(1)) must be positive");
  TORCH_CHECK(qweight.size(1) * (int8 ? 1 : 8) == k, "quant_matmul_cpu: qweight of shape ", qweight.sizes(),
              " does not match K = ", k, " of x");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) > 0 && scales.is_contiguous(),
              "quant_matmul_cpu: scales must be a contiguous (N, groups) tensor with N = ", n, ", got shape ",
              scales.sizes());
  // a word of codes never spans two groups, and tile finds a code's group with a shift
  const int64_t groups = scales.size(1), group_size = k / groups;
  TORCH_CHECK(groups == 1 || (k % groups == 0 && group_size >= 8 && (group_size & (group_size - 1)) == 0),
              "quant_matmul_cpu: K / groups must be a power of two >= 8 (or groups 1), got K = ", k,
              " and ", groups, " groups");
  TORCH_CHECK(scales.scalar_type() == x.scalar_type() && scales.device() == x.device(),
              "quant_matmul_cpu: scales must have the dtype and device of x");
  TORCH_CHECK(int8 != zeros.has_value(), "quant_matmul_cpu: zeros must be given for int4 and None for int8");
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->sizes() == scales.sizes() && zeros->is_contiguous() &&
                    zeros->scalar_type() == scales.scalar_type() && zeros->device() == x.device(),
                "quant_matmul_cpu: zeros must be contiguous with the shape, dtype and device of scales");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "quant_matmul_cpu: bias must be a contiguous (N,) tensor with the dtype and device of x");
  }
}

}  // namespace

at::Tensor quant_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                            c10::string_view isa) {
  check_inputs(x, qweight, scales, zeros, bias);
  const Kernels kernels = kernels_for(isa);
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  if (y.numel() == 0) {
    return y;
  }
  AT_DISPATCH_V2(x.scalar_type(), "quant_matmul_cpu", AT_WRAP([&] {
    quant_matmul_rows<scalar_t>(x, qweight, scales, zeros, bias, kernels, y);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return y;
}

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("quant_matmul_cpu", &quant_matmul_cpu);
}

}  // namespace llmfast
