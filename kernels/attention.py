"""Flash attention forward (FlashAttention-2): Triton kernel, its configs and its launcher.

One program owns BLOCK_M query rows of one query head of one sequence and streams the keys of that
sequence in BLOCK_N blocks with an online softmax (fp32 running max, sum and accumulator), so the
(seqlen_q, seqlen_k) score matrix never leaves registers. Scores are computed in base 2 with the
softmax scale folded into one multiplier (exp2 is one instruction, exp is two). Dense and varlen
batches share the kernel: a dense batch is a varlen one whose sequence b starts at token b * seqlen.
The launchers run inside opaque torch custom ops (llmfast/ops/attention.py) and launch directly.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from llmfast_kernels import tuning
from llmfast_kernels.limits import MAX_GRID_YZ

LOG2_E = math.log2(math.e)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# CUDA configs (BLOCK_M, BLOCK_N, num_warps, num_stages). sm_90: the FA2 shapes that keep a 128-row
# query tile per program; sm_80 (and anything else): smaller tiles that fit 164 KB of shared memory at
# head dim 128. Configs whose tiles exceed the GPU's shared memory (e.g. head dim 256 with 128x128
# tiles) are pruned before compiling (fits_shared_memory), so each set ends with a small config that
# always fits.
SM90_CONFIGS = [
    (128, n, w, s) for n in (64, 128) for w in (4, 8) for s in (2, 3, 4)
] + [(64, 64, 4, 2), (64, 32, 4, 1)]
SM80_CONFIGS = [(128, 64, 4, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 2), (64, 32, 4, 1)]
# sm_90 may also load K and V through tensor descriptors (TMA); whether that pays is the autotuner's
# call (not yet timed on the H100). It is tried with the configs whose fp32 accumulator at head dim 128
# takes at most 64 registers a thread: compiled for sm_90, the 4-warp 128-row ones spill either way.
SM90_TMA_CONFIGS = [(m, n, w, s) for m, n, w, s in SM90_CONFIGS if m * 128 // (32 * w) <= 64]


def interpreter_block(max_seqlen: int) -> int:
    """BLOCK_M = BLOCK_N in the interpreter, which cannot autotune. Its cost is per block step (several
    ms of Python each), hardly per element: 32x32 tiles spread short sequences (17, 37, 53) over several
    blocks so that block edges and causal diagonals are exercised; long ones take 128 (a length of
    1000 is then 8 blocks, not 32, and 16x fewer steps)."""
    return 32 if max_seqlen <= 128 else 128


def seqlen_bucket(max_seqlen: int) -> int:
    """Autotuning key for the sequence length: the best tiles change with it, but not at every length."""
    return min(triton.next_power_of_2(max(max_seqlen, 1)), 16384)


def autotuned(kernel, configs, key, tiles, tma_configs=()):
    """``kernel`` behind triton.autotune over ``configs`` (BLOCK_M, BLOCK_N, num_warps, num_stages), pruned
    by fits_shared_memory(tiles). The forward kernel's configs also set USE_TMA: False for ``configs``,
    True for ``tma_configs``."""
    def config(m, n, w, s, option):
        pre_hook = set_tma_block_shapes if option else None
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n, **option}, num_warps=w, num_stages=s, pre_hook=pre_hook)

    fwd = "USE_TMA" in kernel.arg_names
    pointer = [config(*c, {"USE_TMA": False} if fwd else {}) for c in configs]
    tma = [config(*c, {"USE_TMA": True}) for c in tma_configs]
    return triton.autotune(
        configs=pointer + tma, key=key, prune_configs_by={"early_config_prune": fits_shared_memory(tiles)},
    )(kernel)


def fits_shared_memory(tiles):
    """early_config_prune: drop the configs whose tiles need more shared memory than the GPU gives one
    block; they would compile, then fail to load. ``tiles(BLOCK_M, BLOCK_N)`` is (rows held once, rows
    streamed through num_stages buffers of K and V, or of Q and dO), each BLOCK_D wide. Compiled for
    sm_90 (tests/compile_kernels.py), the 16-bit configs got exactly these bytes or a little more (less
    only for small tiles, far under any limit), and each config this drops was over the limit. fp32
    tiles are laid out otherwise; at 4 bytes an element the estimate was above what they got (295-393 KB
    against 393 KB at head dim 256, 164 KB against 197 KB at 128), and without it an fp32 backward at
    head dim 128 kept only configs over the limit. What is left then goes through ``tuning.limit``."""
    def prune(configs, named_args, **meta):
        q = named_args["Q"]
        limit = getattr(torch.cuda.get_device_properties(q.device), "shared_memory_per_block_optin", None)
        if limit is None:
            return tuning.limit(configs)

        kept = [c for c in configs if tile_bytes(tiles, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages,
                                                 meta["BLOCK_D"], q.element_size()) <= limit]
        return tuning.limit(kept or configs[-1:])
    return prune


def tile_bytes(tiles, block_m: int, block_n: int, num_stages: int, block_d: int, element_size: int = 2) -> int:
    """Shared memory of one config's tiles, as fits_shared_memory estimates it."""
    held, streamed = tiles(block_m, block_n)
    return element_size * block_d * (held + num_stages * 2 * streamed)


def set_tma_block_shapes(args: dict) -> None:
    """Autotune pre-hook: a descriptor's box is one (BLOCK_N keys, 1 head, BLOCK_D dims) tile."""
    for name in ("K_desc", "V_desc"):
        if args[name] is not None:
            args[name].block_shape = [args["BLOCK_N"], 1, args["BLOCK_D"]]


def kv_descriptors(k: Tensor, v: Tensor, varlen: bool, block_d: int):
    """(K_desc, V_desc) over (tokens, kv_heads, head_dim), or None where TMA cannot read the tensors:
    unaligned base or strides, a broadcast (stride 0) row or head, or dense batches whose sequences are
    not one run of rows."""
    descriptors = []
    for t in (k, v):
        rows = t.shape[0] if varlen else t.shape[0] * t.shape[1]
        row_stride, head_stride = (t.stride(0), t.stride(1)) if varlen else (t.stride(1), t.stride(2))
        one_run = varlen or t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)
        aligned = row_stride > 0 and head_stride > 0 and base_aligned(t) and all(
            x * t.element_size() % 16 == 0 for x in (row_stride, head_stride))
        if not (one_run and aligned and rows > 0):
            return None
        descriptors.append(TensorDescriptor(t, [rows, t.shape[-2], t.shape[-1]], [row_stride, head_stride, 1],
                                            [16, 1, block_d]))  # the box is set per config
    return tuple(descriptors)


def base_aligned(t: Tensor) -> bool:
    """Whether ``t`` starts on a 16-byte boundary. PyTorch's allocators align storages, but one from
    frombuffer or DLPack may not be; a fake tensor (tests/compile_kernels.py) has no address, only its offset."""
    if torch._subclasses.fake_tensor.is_fake(t):
        return t.storage_offset() * t.element_size() % 16 == 0
    return t.data_ptr() % 16 == 0


@triton.jit
def sequence_bounds(b, Cu_seqlens, seqlen, IS_VARLEN: tl.constexpr):
    """(first token, length, first row) of sequence ``b``: from cu_seqlens (varlen) or ``b * seqlen``
    (dense). The first token indexes the LSE rows; the first row is what to add along the sequence stride:
    the first token for varlen (whose batch strides are 0), 0 for dense (the batch stride does it)."""
    if IS_VARLEN:
        start = tl.load(Cu_seqlens + b)
        length = tl.load(Cu_seqlens + b + 1) - start
    else:
        start = b * seqlen
        length = seqlen
    start = start.to(tl.int64)
    return start, length, start if IS_VARLEN else start * 0


@triton.jit
def _attn_fwd_inner(
    acc, m_i, l_i, q, K_block, V_block, stride_ks, stride_vs, K_desc, V_desc, tok_k, kv_h,
    offs_m, offs_d, lo, hi, seqlen_k, causal_shift, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Folds key blocks [lo, hi) into (acc, m_i, l_i). MASKED: some scores in these blocks are past
    seqlen_k or above the causal diagonal; the unmasked loop skips those compares. USE_TMA: K and V tiles
    come through tensor descriptors (the H100's copy engine) instead of pointer loads."""
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows_n = offs_n.to(tl.int64)[:, None]  # int64: a long sequence's row times its stride can pass 2**31
        kv_mask = d_mask & (offs_n[:, None] < seqlen_k)
        if USE_TMA:
            # the descriptors span every sequence's rows (tokens, kv_heads, head_dim): rows past this
            # sequence are zeros past the tensor's end, else the next sequence's keys; the masked loop
            # hides their scores and zeroes their values (0 * NaN would leak)
            row = (tok_k + start_n).to(tl.int32)
            k = K_desc.load([row, kv_h, 0]).reshape(BLOCK_N, BLOCK_D).to(DOT_DTYPE)
            v = V_desc.load([row, kv_h, 0]).reshape(BLOCK_N, BLOCK_D)
            if MASKED:
                v = tl.where(kv_mask, v, 0.0)
            v = v.to(DOT_DTYPE)
        else:
            k = tl.load(K_block + rows_n * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            k = k.to(DOT_DTYPE)
            v = tl.load(V_block + rows_n * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            v = v.to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = offs_n[None, :] < seqlen_k
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m = -inf; subtracting 0 instead keeps exp2 free of NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # p is rounded to the input dtype, as the tensor cores take it
        p = p.to(V_block.dtype.element_ty).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# Lengths are not specialised: Triton would otherwise turn a length of 1 into a constant (and compile
# again for lengths divisible by 16), which buys nothing here.
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _attn_fwd_kernel(
    # Q, O: (batch, seqlen_q, heads, head_dim) or (total_q, heads, head_dim); K, V likewise with kv_heads;
    # LSE: (heads, batch * seqlen_q or total_q) fp32
    Q, K, V, O, LSE,
    Cu_seqlens_q, Cu_seqlens_k,  # int32 (batch+1,), read only when IS_VARLEN
    K_desc, V_desc,  # USE_TMA: descriptors of K, V as (tokens, kv_heads, head_dim); else None
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lse_h,
    seqlen_q, seqlen_k,  # dense lengths (varlen reads cu_seqlens)
    qk_scale,  # softmax_scale * log2(e)
    SEQ_BUCKET,  # only an autotuning key
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), heads, batch). Writes O rows and their natural-log LSE;
    a row that sees no key gets O = 0 and LSE = -inf."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok_q, seqlen_q, q_seq0 = sequence_bounds(b, Cu_seqlens_q, seqlen_q, IS_VARLEN)
    tok_k, seqlen_k, k_seq0 = sequence_bounds(b, Cu_seqlens_k, seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    kv_h = h // GROUP  # GQA: read the shared kv head in place, never a repeated copy
    b64 = b.to(tl.int64)
    Q_block = Q + b64 * stride_qb + q_seq0 * stride_qs + h * stride_qh
    K_block = K + b64 * stride_kb + k_seq0 * stride_ks + kv_h * stride_kh
    V_block = V + b64 * stride_vb + k_seq0 * stride_vs + kv_h * stride_vh
    O_block = O + b64 * stride_ob + q_seq0 * stride_os + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    rows_m = offs_m.to(tl.int64)[:, None]  # int64: a long sequence's row times its stride can pass 2**31
    q = tl.load(Q_block + rows_m * stride_qs + offs_d[None, :], mask=q_mask, other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # bottom-right causal: query i sees keys j <= i + causal_shift
    causal_shift = seqlen_k - seqlen_q
    if IS_CAUSAL:
        # keys past the block's last row's diagonal are skipped; blocks wholly left of its first
        # row's diagonal need no mask
        hi = tl.minimum(seqlen_k, start_m + BLOCK_M + causal_shift)
        full_hi = tl.minimum(seqlen_k, start_m + 1 + causal_shift)
    else:
        hi = seqlen_k
        full_hi = seqlen_k
    hi = tl.maximum(hi, 0)
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attn_fwd_inner(
        acc, m_i, l_i, q, K_block, V_block, stride_ks, stride_vs, K_desc, V_desc, tok_k, kv_h, offs_m, offs_d,
        0, full_hi, seqlen_k, causal_shift, qk_scale, False, IS_CAUSAL, HEAD_DIM,
        BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION, USE_TMA,
    )
    acc, m_i, l_i = _attn_fwd_inner(
        acc, m_i, l_i, q, K_block, V_block, stride_ks, stride_vs, K_desc, V_desc, tok_k, kv_h, offs_m, offs_d,
        full_hi, hi, seqlen_k, causal_shift, qk_scale, True, IS_CAUSAL, HEAD_DIM,
        BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION, USE_TMA,
    )

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O_block + rows_m * stride_os + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_mask)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + h.to(tl.int64) * stride_lse_h + tok_q + offs_m, lse, mask=offs_m < seqlen_q)


FWD_KEY = ["BLOCK_D", "GROUP", "IS_CAUSAL", "IS_VARLEN", "SEQ_BUCKET"]

def fwd_tiles(block_m: int, block_n: int) -> tuple[int, int]:
    return block_m, block_n  # Q held; K and V streamed


_attn_fwd_sm90 = autotuned(_attn_fwd_kernel, SM90_CONFIGS, FWD_KEY, fwd_tiles)
_attn_fwd_sm90_tma = autotuned(_attn_fwd_kernel, [], FWD_KEY, fwd_tiles, SM90_TMA_CONFIGS)
_attn_fwd_sm90_either = autotuned(_attn_fwd_kernel, SM90_CONFIGS, FWD_KEY, fwd_tiles, SM90_TMA_CONFIGS)
_attn_fwd_sm80 = autotuned(_attn_fwd_kernel, SM80_CONFIGS, FWD_KEY, fwd_tiles)


def pick(device: torch.device, plain, sm90, sm80):
    """The launch handle for ``device``: the plain kernel in the interpreter, else an autotuned one."""
    if device.type != "cuda":
        return plain
    return sm90 if torch.cuda.get_device_capability(device)[0] >= 9 else sm80


def layout(t: Tensor, varlen: bool) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` with a unit head_dim stride, and its (batch, seq, head) strides; varlen has batch stride 0."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if varlen:  # (tokens, heads, head_dim)
        return t, (0, t.stride(0), t.stride(1))
    return t, (t.stride(0), t.stride(1), t.stride(2))  # (batch, seq, heads, head_dim)


def launch_shape(q: Tensor, k: Tensor, cu_seqlens_q: Tensor | None, max_seqlen_q: int, max_seqlen_k: int):
    """(batch, max_seqlen_q, max_seqlen_k, dense seqlen_q, dense seqlen_k) for the kernels' grids, whose z
    size is the batch: a ValueError past CUDA's limit on it (flash-attn's grids have the same)."""
    batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    if batch > MAX_GRID_YZ:
        name = "q" if cu_seqlens_q is None else "cu_seqlens_q"
        raise ValueError(f"{name}: the Triton kernels take at most {MAX_GRID_YZ} sequences a call (a CUDA grid "
                         f"dimension), got {batch}; split the batch")
    if cu_seqlens_q is not None:
        return batch, max_seqlen_q, max_seqlen_k, 0, 0
    return batch, q.shape[1], k.shape[1], q.shape[1], k.shape[1]


def dot_meta(dtype: torch.dtype, device: torch.device) -> dict:
    """DOT_DTYPE, the type tl.dot operands are cast to, and DOT_PRECISION. float32 gets IEEE fp32 dots
    (not TF32) to keep float32 accuracy; 16-bit inputs use the tensor cores on the GPU. The interpreter
    multiplies bf16 as raw uint16 and fp16 without BLAS, so there 16-bit operands are widened to fp32
    (exact products summed in fp32, as the tensor cores do)."""
    if dtype == torch.float32 or device.type != "cuda":
        return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    return dict(DOT_DTYPE=TL_DTYPES[dtype], DOT_PRECISION="tf32")


def block_d(head_dim: int) -> int:
    # tl.dot needs every dim >= 16; the padding lanes are masked to 0 on load
    return max(16, triton.next_power_of_2(head_dim))


def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float, use_tma: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """q: (batch, seqlen_q, heads, head_dim) or varlen (total_q, heads, head_dim); k, v likewise with
    kv_heads; any strides (head_dim is made unit-stride). Inputs are validated by llmfast.ops.attention.
    Returns (o, lse): o contiguous, shaped like q, in q.dtype; lse (heads, batch * seqlen_q or total_q)
    float32 natural-log sum of exp of the scaled scores, -inf for rows that see no key.
    use_tma: None lets the sm_90 autotuner choose between pointer and descriptor loads where the
    tensors allow descriptors; True or False forces one (the interpreter takes pointer loads unless True)."""
    varlen = cu_seqlens_q is not None
    heads, head_dim = q.shape[-2], q.shape[-1]
    batch, grid_sq, grid_sk, seqlen_q, seqlen_k = launch_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    q, q_strides = layout(q, varlen)
    k, k_strides = layout(k, varlen)
    v, v_strides = layout(v, varlen)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _, o_strides = layout(o, varlen)
    rows = q.shape[0] if varlen else q.shape[0] * q.shape[1]
    lse = torch.empty((heads, rows), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    cu_q = cu_seqlens_q if varlen else lse  # never read when dense
    cu_k = cu_seqlens_k if varlen else lse
    meta = dict(
        GROUP=heads // k.shape[-2], HEAD_DIM=head_dim, IS_CAUSAL=causal, IS_VARLEN=varlen,
        **dot_meta(q.dtype, q.device), BLOCK_D=block_d(head_dim),
    )
    kernel = pick(q.device, _attn_fwd_kernel, _attn_fwd_sm90, _attn_fwd_sm80)
    if use_tma and kernel is _attn_fwd_sm80:
        raise ValueError("use_tma: tensor descriptor loads need an sm_90 GPU")
    descriptors = None
    if use_tma or (use_tma is None and kernel is _attn_fwd_sm90):
        descriptors = kv_descriptors(k, v, varlen, meta["BLOCK_D"])
        if use_tma and descriptors is None:
            raise ValueError("use_tma: k and v need 16-byte aligned strides and one run of rows for descriptors")
    if kernel is _attn_fwd_sm90 and descriptors is not None:
        kernel = _attn_fwd_sm90_tma if use_tma else _attn_fwd_sm90_either
    if kernel is _attn_fwd_kernel:  # the interpreter: one fixed config
        block = interpreter_block(max(grid_sq, grid_sk))
        meta.update(BLOCK_M=block, BLOCK_N=block, USE_TMA=descriptors is not None)
        for desc in descriptors or ():
            desc.block_shape = [block, 1, meta["BLOCK_D"]]  # as set_tma_block_shapes does per config
    args = (
        q, k, v, o, lse, cu_q, cu_k, *(descriptors or (None, None)),
        *q_strides, *k_strides, *v_strides, *o_strides, lse.stride(0),
        seqlen_q, seqlen_k, softmax_scale * LOG2_E, seqlen_bucket(max(grid_sq, grid_sk)),
    )
    grid = lambda META: (triton.cdiv(grid_sq, META["BLOCK_M"]), heads, batch)  # noqa: E731
    kernel[grid](*args, **meta)
    return o, lse
