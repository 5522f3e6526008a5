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

// Dense float32 linear for small batches: y = x @ W.T (+ bias) with W (N, K) packed by
// llmfast.engine.cpu_linear.pack_weight into (ceil(N / 32), K, 32) column panels. x: (M, K) contiguous
// float32; n: N; bias: (N,) float32 or None; isa as quant_matmul_cpu. Returns y: (M, N) float32.
at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                             const std::optional<at::Tensor>& bias, c10::string_view isa);

// Paged KV cache (llmfast.ops.paged). k, v: (tokens, kv_heads, head_dim) contiguous; k_cache, v_cache:
// (num_blocks, block_size, kv_heads, head_dim), same dtype and strides, unit head_dim stride; slot_mapping:
// int64 (tokens,) contiguous, -1 skips a token. Writes the caches in place.
void write_kv_cache_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& slot_mapping);

// q: (total_q, heads, head_dim) contiguous float32/float16/bfloat16; caches as write_kv_cache_cpu;
// block_tables: int32 (num_seqs, max_blocks); context_lens: int32 (num_seqs,); cu_seqlens_q: int32
// (num_seqs+1,) or None for decode (one query per sequence); isa as quant_matmul_cpu. Inputs validated by
// llmfast.ops.paged. Returns o: like q.
at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& context_lens,
                               const std::optional<at::Tensor>& cu_seqlens_q, double softmax_scale,
                               c10::string_view isa);

}  // namespace llmfast
