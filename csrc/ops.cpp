// Schemas of the llmfast C++ CPU ops; the kernels live in cpu/*.cpp (one file per op family).
// The CUDA ops (cuda/*.cu, built as llmfast._C_cuda) add their schemas with TORCH_LIBRARY_FRAGMENT.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(llmfast, m) {
  // x: (M, N) float32/float16/bfloat16; residual: like x or None; weight, bias: (N,) float32 or None.
  // Returns (y, h): y like x; h = x + residual rounded to x.dtype, or an empty (0,) tensor without
  // residual.
  m.def("add_norm_cpu(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool is_rms)"
        " -> (Tensor, Tensor)");
  // x: (M, K) float32/float16/bfloat16; qweight: int8 (N, K) or int32 (N, K / 8) holding 4-bit codes;
  // scales: (N, groups) in x.dtype; zeros: like scales for 4 bits, None for 8; bias: (N,) in x.dtype or
  // None; isa: "auto", or "avx512" / "avx2" / "baseline" to test that copy of the kernels.
  // Returns x @ dequantized weight.T (+ bias): (M, N) in x.dtype.
  m.def("quant_matmul_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, str isa='auto')"
        " -> Tensor");
  // x: (M, K) float32; packed: (ceil(N / 32), K, 32) float32 column panels of an (N, K) weight; n: N;
  // bias: (N,) float32 or None. Returns x @ weight.T (+ bias): (M, N) float32.
  m.def("packed_linear_cpu(Tensor x, Tensor packed, int n, Tensor? bias, str isa='auto') -> Tensor");
  // Paged KV cache, layout (num_blocks, block_size, kv_heads, head_dim); see llmfast/ops/paged.py.
  // k, v: (tokens, kv_heads, head_dim); slot_mapping: int64 (tokens,), -1 skips. Writes the caches in place.
  m.def("write_kv_cache_cpu(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping)"
        " -> ()");
  // q: (total_q, heads, head_dim); block_tables, context_lens, cu_seqlens_q: int32 (None: decode); isa as
  // quant_matmul_cpu. Returns o like q.
  m.def("paged_attention_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables,"
        " Tensor context_lens, Tensor? cu_seqlens_q, float softmax_scale, str isa='auto') -> Tensor");
}

// Empty: importing llmfast._C only has to load this library so the registrations above run.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
