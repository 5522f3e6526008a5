// Paged attention on CPU over the block cache: argument checks, the split into tasks and the choice of
// kernel copy. The kernels are in paged_prefill.h and paged_decode.h, the cache writes in kv_cache.cpp.
// The kernels are compiled for AVX-512, AVX2 + FMA and the baseline (the build has no -march flag, and the
// SSE2 copy made chunked prefill slower than the reference): the widest this CPU has, or the one ``isa``
// names, so the tests run every copy on one machine.
#include "ops.h"
#include "cache_layout.h"
#include "isa.h"
#include "paged_decode.h"
#include "paged_prefill.h"

#include <algorithm>
#include <vector>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace llmfast {
namespace {

using paged::PagedArgs;
using paged::Tensors;

struct Tile {  // chunked prefill: query tokens [begin, end) of sequence seq
  int64_t seq, begin, end;
};

// What a call's tasks share. Decode (tiles null): task w is the kv-head range w % splits of sequence
// w / splits. Chunked prefill: task w is tile w / kv_heads for kv head w % kv_heads.
template <typename scalar_t>
struct Work {
  PagedArgs a;
  Tensors<scalar_t> x;
  int64_t splits;
  const Tile* tiles;
  const int64_t* cu_seqlens_q;
};

template <typename scalar_t, int V>
inline __attribute__((always_inline)) void run_tasks(const Work<scalar_t>& w, int64_t begin, int64_t end) {
  const int64_t kv_heads = w.a.kv_heads;
  if (w.tiles == nullptr) {
    std::vector<float> scratch;  // reused by the tasks of this thread
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task % w.splits;
      paged::attend_decode<scalar_t, V>(w.a, w.x, task / w.splits, part * kv_heads / w.splits,
                                        (part + 1) * kv_heads / w.splits, scratch);
    }
    return;
  }
  for (int64_t task = begin; task < end; ++task) {
    const Tile& t = w.tiles[task / kv_heads];
    const int64_t q_begin = w.cu_seqlens_q[t.seq], n_q = w.cu_seqlens_q[t.seq + 1] - q_begin;
    paged::attend_tile<scalar_t, V>(w.a, w.x, t.seq, task % kv_heads, q_begin, n_q, t.begin, t.end);
  }
}

// One copy of the kernels per instruction set, V float32 lanes per vector register.
#if defined(__x86_64__)
template <typename scalar_t>
__attribute__((target("avx512f,fma"))) void tasks_avx512(const Work<scalar_t>& w, int64_t begin, int64_t end) {
  run_tasks<scalar_t, 16>(w, begin, end);
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void tasks_avx2(const Work<scalar_t>& w, int64_t begin, int64_t end) {
  run_tasks<scalar_t, 8>(w, begin, end);
}
#endif

template <typename scalar_t>
void tasks_baseline(const Work<scalar_t>& w, int64_t begin, int64_t end) {
  run_tasks<scalar_t, 4>(w, begin, end);
}

template <typename scalar_t>
using TasksFn = void (*)(const Work<scalar_t>&, int64_t, int64_t);

template <typename scalar_t>
TasksFn<scalar_t> tasks_for(Isa isa) {
  switch (isa) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return tasks_avx512<scalar_t>;
    case Isa::kAvx2:
      return tasks_avx2<scalar_t>;
#endif
    default:
      return tasks_baseline<scalar_t>;
  }
}

// The Python wrappers check all of this before calling; see cache_layout.h.
void check_paged_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                      const std::optional<at::Tensor>& cu_seqlens_q) {
  check_caches("paged_attention_cpu", k_cache, v_cache);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == k_cache.size(3) && q.dtype() == k_cache.dtype() &&
                  q.size(1) % k_cache.size(2) == 0,
              "paged_attention_cpu: q must be (tokens, heads, head_dim), heads a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 &&
                  context_lens.size(0) == block_tables.size(0),
              "paged_attention_cpu: block_tables must be int32 (num_seqs, max_blocks), context_lens int32 "
              "(num_seqs,)");
  const int64_t num_seqs = block_tables.size(0), max_blocks = block_tables.size(1);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1);
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < num_seqs; ++i) {
    TORCH_CHECK(lens[i] >= 0 && lens[i] <= max_blocks * bs, "paged_attention_cpu: context_lens[", i, "] = ",
                lens[i], " is outside [0, ", max_blocks * bs, "]");
    for (int64_t b = 0; b < (lens[i] + bs - 1) / bs; ++b) {
      const int32_t id = tables[i * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "paged_attention_cpu: block_tables[", i, ", ", b, "] = ", id,
                  " is outside [0, ", num_blocks, ")");
    }
  }
  if (!cu_seqlens_q) {
    TORCH_CHECK(q.size(0) == num_seqs, "paged_attention_cpu: decode takes one query row per sequence");
    return;
  }
  TORCH_CHECK(cu_seqlens_q->scalar_type() == at::kInt && cu_seqlens_q->dim() == 1 &&
                  cu_seqlens_q->size(0) == num_seqs + 1 && cu_seqlens_q->is_contiguous(),
              "paged_attention_cpu: cu_seqlens_q must be contiguous int32 (num_seqs + 1,)");
  const int32_t* cu = cu_seqlens_q->const_data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[num_seqs] == q.size(0), "paged_attention_cpu: cu_seqlens_q must run from 0 to ",
              "the number of query rows");
  for (int64_t i = 0; i < num_seqs; ++i) {
    TORCH_CHECK(cu[i + 1] >= cu[i] && cu[i + 1] - cu[i] <= lens[i], "paged_attention_cpu: sequence ", i,
                " has more query tokens than context_lens[", i, "] or a negative count");
  }
}

}  // namespace

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& context_lens,
                               const std::optional<at::Tensor>& cu_seqlens_q, double softmax_scale,
                               c10::string_view isa) {
  TORCH_CHECK(q.is_contiguous() && block_tables.is_contiguous() && context_lens.is_contiguous(),
              "paged_attention_cpu: q, block_tables and context_lens must be contiguous");
  check_paged_args(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q);
  TORCH_CHECK(same_layout(k_cache, v_cache),
              "paged_attention_cpu: caches need unit head_dim stride and equal strides");
  const Isa kernels = pick_isa(isa, "paged_attention_cpu");
  const int64_t num_seqs = block_tables.size(0), kv_heads = k_cache.size(2);
  const PagedArgs a{q.size(1), kv_heads, q.size(2), k_cache.size(1), block_tables.size(1),
                    k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                    block_tables.const_data_ptr<int32_t>(), context_lens.const_data_ptr<int32_t>(),
                    static_cast<float>(softmax_scale)};
  at::Tensor o = at::empty_like(q);
  // Chunked prefill: one task per (query tile, kv head), so one long prefill still spreads over the cores.
  // Decode: whole sequences per task (each slot read in one pass), unless there are fewer than threads: then
  // each sequence's kv heads in as many contiguous ranges as it takes to give every thread one (one range
  // per kv head read each slot in pieces: at 32/8, D128 it ran batch-1 decode at 0.69x SDPA's speed, against
  // 0.85x without any split, on a machine whose speed drifted between those runs).
  std::vector<int64_t> offsets;
  std::vector<Tile> tiles;
  int64_t splits = 1, tasks = num_seqs;
  if (cu_seqlens_q) {
    const int32_t* cu = cu_seqlens_q->const_data_ptr<int32_t>();
    offsets.assign(cu, cu + num_seqs + 1);
    for (int64_t i = 0; i < num_seqs; ++i) {
      const int64_t n_q = offsets[i + 1] - offsets[i];
      for (int64_t begin = 0; begin < n_q; begin += paged::kQueryTile) {
        tiles.push_back({i, begin, std::min(n_q, begin + paged::kQueryTile)});
      }
    }
    tasks = static_cast<int64_t>(tiles.size()) * kv_heads;
  } else {
    const int64_t threads = at::get_num_threads();
    splits = num_seqs > 0 && num_seqs < threads ? std::min(kv_heads, (threads + num_seqs - 1) / num_seqs) : 1;
    tasks = num_seqs * splits;
  }
  AT_DISPATCH_V2(q.scalar_type(), "paged_attention_cpu", AT_WRAP([&] {
    const Work<scalar_t> w{a,
                           {q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(),
                            v_cache.const_data_ptr<scalar_t>(), o.mutable_data_ptr<scalar_t>()},
                           splits, cu_seqlens_q ? tiles.data() : nullptr, offsets.data()};
    const TasksFn<scalar_t> run = tasks_for<scalar_t>(kernels);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { run(w, begin, end); });
  }), at::kHalf, at::kBFloat16, at::kFloat);
  return o;
}

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("paged_attention_cpu", &paged_attention_cpu);
}

}  // namespace llmfast
