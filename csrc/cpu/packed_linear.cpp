// Dense float32 linear on CPU for the engine: y (M, N) = x (M, K) @ W.T (+ bias), W pre-packed into
// column panels, packed (panels, K, kPanelCols) with packed[p, k, j] = W[p * kPanelCols + j, k] (zero
// past N), so one panel is a contiguous stream.
//
// For each panel a tile of MR rows keeps MR x (kPanelCols or a part of it) sums in vector registers; each
// k adds x[r, k] (broadcast) times the panel's row k, so no horizontal sums are needed and the panel is
// read once per tile (from L2 after the first tile). Rows run in blocks whose x stays in L2. Compiled three
// times under target attributes (AVX-512, AVX2 + FMA, baseline) with GCC vector extensions, like
// quant_matmul.cpp; the widest the CPU has runs.
#include "ops.h"
#include "isa.h"
#include "simd.h"

#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace llmfast {
namespace {

constexpr int64_t kPanelCols = 32;          // two AVX-512 vectors
constexpr int64_t kRowBlockBytes = 256 << 10;  // x rows per block: this many bytes stay in L2
// A panel longer than 2048 rows (256 KB) would not stay in L2 beside a row block of x: K then runs in
// blocks of at most 1024 rows (128 KB), read from L2 by every row tile.
constexpr int64_t kMaxPanelRows = 2048;
constexpr int64_t kMaxKBlock = 1024;
constexpr int64_t kGrainMacs = 1 << 17;     // multiply-adds per parallel task at least

struct Args {
  const float* x;       // (M, K)
  const float* packed;  // (panels, K, kPanelCols)
  const float* bias;    // (N,) or null
  float* y;             // (M, N)
  int64_t m, k, n;
};

// x[r, k] times row k of the tile's columns, added to acc.
template <int V, int MR, int NV>
inline __attribute__((always_inline)) void step(typename Vec<V>::f (&acc)[MR][NV], const float* panel,
                                                const float* x, int64_t k_len, int64_t k) {
  using vf = typename Vec<V>::f;
  vf w[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    w[j] = load<vf>(panel + k * kPanelCols + j * V);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const float xv = x[r * k_len + k];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      acc[r][j] += xv * w[j];
    }
  }
}

// Rows [row, row + MR) of columns [part * NV * V, (part + 1) * NV * V) of panel p, the products over
// k in [k0, k1) added to what earlier k blocks left in y.
template <int V, int MR, int NV>
inline __attribute__((always_inline)) void tile(const Args& a, int64_t p, int64_t part, int64_t row, int64_t k0,
                                                int64_t k1) {
  using vf = typename Vec<V>::f;
  // A multiply-add waits for the previous one on its sum: a few rows (the tail of a row block, a
  // decode step of one sequence) keep KU sets of sums over alternate k, so that eight chains run at once.
  constexpr int KU = MR * NV >= 8 ? 1 : MR * NV >= 4 ? 2 : 4;
  const float* panel = a.packed + p * a.k * kPanelCols + part * NV * V;
  const float* x = a.x + row * a.k;
  const int64_t col = p * kPanelCols + part * NV * V, cols = std::min<int64_t>(NV * V, a.n - col);
  vf acc[KU][MR][NV] = {};
  if (k0 > 0) {
    for (int r = 0; r < MR; ++r) {
      float sums[NV * V] = {};
      std::memcpy(sums, a.y + (row + r) * a.n + col, cols * sizeof(float));
      std::memcpy(acc[0][r], sums, sizeof(sums));
    }
  }
  int64_t k = k0;
  for (; k + KU <= k1; k += KU) {
    if constexpr (NV * V < kPanelCols) {
      // whole panel rows: the first tile, reading from memory, then streams them once, not once per part
      __builtin_prefetch(a.packed + p * a.k * kPanelCols + (k + 16) * kPanelCols);
      __builtin_prefetch(a.packed + p * a.k * kPanelCols + (k + 16) * kPanelCols + 16);
    }
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      step<V, MR, NV>(acc[u], panel, x, a.k, k + u);
    }
  }
  for (; k < k1; ++k) {
    step<V, MR, NV>(acc[0], panel, x, a.k, k);
  }
  const bool add_bias = a.bias && k1 == a.k;
  for (int r = 0; r < MR; ++r) {
    float out[NV * V];
#pragma GCC unroll 4
    for (int u = 1; u < KU; ++u) {
      for (int j = 0; j < NV; ++j) {
        acc[0][r][j] += acc[u][r][j];
      }
    }
    std::memcpy(out, acc[0][r], sizeof(out));
    float* dst = a.y + (row + r) * a.n + col;
    for (int64_t j = 0; j < cols; ++j) {
      dst[j] = out[j] + (add_bias ? a.bias[col + j] : 0.f);
    }
  }
}

// `rows` (1 .. MR) rows: the count is a template argument so the sums stay in registers.
template <int V, int MR, int NV>
inline __attribute__((always_inline)) void tile_rows(const Args& a, int64_t p, int64_t part, int64_t row,
                                                     int64_t rows, int64_t k0, int64_t k1) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      tile_rows<V, MR - 1, NV>(a, p, part, row, rows, k0, k1);
      return;
    }
  }
  tile<V, MR, NV>(a, p, part, row, k0, k1);
}

// A tile spans NV vectors of V floats: the whole panel, or (where registers are few) a part of it, so
// that more rows share each weight load. A long K runs in blocks, so that a row block of x and a
// panel's block of rows both stay in L2 and the weights stream from memory once per row block
// (4096 x 4096 at 1024 rows on the AVX2 EPYC: 0.58x F.linear unblocked, 0.83x in blocks).
template <int V, int MR, int NV>
inline __attribute__((always_inline)) void panels(const Args& a, int64_t p_begin, int64_t p_end) {
  static_assert(kPanelCols % (NV * V) == 0, "a tile spans a whole part of the panel");
  constexpr int64_t kParts = kPanelCols / (NV * V);
  const int64_t k_blocks = a.k <= kMaxPanelRows ? 1 : (a.k + kMaxKBlock - 1) / kMaxKBlock;
  const int64_t k_block = (a.k + k_blocks - 1) / k_blocks;
  const int64_t block_rows = std::max<int64_t>(MR, kRowBlockBytes / (4 * k_block) / MR * MR);
  for (int64_t row0 = 0; row0 < a.m; row0 += block_rows) {
    const int64_t row_end = std::min(a.m, row0 + block_rows);
    for (int64_t k0 = 0; k0 < a.k; k0 += k_block) {
      const int64_t k1 = std::min(a.k, k0 + k_block);
      for (int64_t p = p_begin; p < p_end; ++p) {
        for (int64_t part = 0; part < kParts; ++part) {
          if (p * kPanelCols + part * NV * V >= a.n) {
            break;  // the zero padding past N
          }
          for (int64_t row = row0; row < row_end; row += MR) {
            tile_rows<V, MR, NV>(a, p, part, row, std::min<int64_t>(MR, row_end - row), k0, k1);
          }
        }
      }
    }
  }
}

// Sums per tile: MR x NV vectors, plus the NV weight vectors and one broadcast, fit the registers (32 with
// AVX-512, 16 with AVX2). AVX2 takes half a panel and six rows: twelve independent sums hide the
// multiply-add latency (two units of five cycles on Zen 2) that eight sums of two rows x 32 columns did not
// (benchmarks/results/cpu_linear_avx2.json).
#if defined(__x86_64__)
__attribute__((target("avx512f,fma"))) void panels_avx512(const Args& a, int64_t b, int64_t e) {
  panels<16, 8, 2>(a, b, e);
}
__attribute__((target("avx2,fma"))) void panels_avx2(const Args& a, int64_t b, int64_t e) {
  if (a.m < 8) {
    panels<8, 2, 4>(a, b, e);  // a few rows read the weights from memory once, as whole panel rows
  } else {
    panels<8, 6, 2>(a, b, e);
  }
}
#endif
void panels_baseline(const Args& a, int64_t b, int64_t e) {
  panels<4, 1, 8>(a, b, e);
}

using PanelsFn = void (*)(const Args&, int64_t, int64_t);

PanelsFn panels_for(c10::string_view isa) {
  switch (pick_isa(isa, "packed_linear_cpu")) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return panels_avx512;
    case Isa::kAvx2:
      return panels_avx2;
#endif
    default:
      return panels_baseline;
  }
}

}  // namespace

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                             const std::optional<at::Tensor>& bias, c10::string_view isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "packed_linear_cpu: x must be a contiguous float32 (M, K) CPU tensor");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k > 0, "packed_linear_cpu: K (x.size(1)) must be positive");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kFloat &&
                  packed.size(1) == k && packed.size(2) == kPanelCols && packed.device().is_cpu(),
              "packed_linear_cpu: packed must be a contiguous float32 (panels, K, ", kPanelCols, ") CPU tensor with K = ", k);
  TORCH_CHECK(n > (packed.size(0) - 1) * kPanelCols && n <= packed.size(0) * kPanelCols,
              "packed_linear_cpu: n = ", n, " does not match ", packed.size(0), " panels of ", kPanelCols);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() && bias->scalar_type() == at::kFloat,
                "packed_linear_cpu: bias must be a contiguous float32 (N,) tensor");
  }
  const PanelsFn run = panels_for(isa);
  at::Tensor y = at::empty({m, n}, x.options());
  if (y.numel() == 0) {
    return y;
  }
  const Args a{x.const_data_ptr<float>(), packed.const_data_ptr<float>(),
               bias.has_value() ? bias->const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), m, k, n};
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / (m * k * kPanelCols));
  at::parallel_for(0, packed.size(0), grain, [&](int64_t begin, int64_t end) { run(a, begin, end); });
  return y;
}

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("packed_linear_cpu", &packed_linear_cpu);
}

}  // namespace llmfast
