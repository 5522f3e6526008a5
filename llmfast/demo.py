"""`llmfast demo`: batched generation with the engine, then every op on every backend available here
against the reference.

Without ``--model`` the engine runs on an embedded default that needs no download: a small random Qwen3
checkpoint and a byte-level BPE tokenizer trained on a few sentences, written to a temporary folder
(``build_tiny_checkpoint``, which the tests use as well).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import llmfast
from llmfast import ops
from llmfast.backends import resolve
from llmfast.device import resolve_device

DEMO_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps keys and values in fixed-size blocks of the cache.",
    "A scheduler batches requests continuously, so prefill and decode share one forward.",
    "Kernels fuse the residual add into the normalisation of each layer.",
    "Quantized weights take a quarter of the memory and most of the bandwidth back.",
    "The prefix cache lets a request reuse the blocks another one already computed.",
    "Héllo wörld: ünïcode, 日本語 text and numbers 0123456789 must survive detokenisation.",
    "Once upon a time, a small model answered every question with random words.",
]
# ChatML, as Qwen's templates; the bos token is written by the template, so a rendered chat is
# tokenized without adding special tokens again
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BOS, EOS = "<|begin|>", "<|im_end|>"


def build_tiny_checkpoint(folder: str | Path, *, hidden_size: int = 256, num_layers: int = 4,
                          max_position_embeddings: int = 512, seed: int = 0) -> Path:
    """Writes a random Qwen3 checkpoint (float32 safetensors) with a byte-level BPE tokenizer trained on
    ``DEMO_PROMPTS`` (it adds a bos token, as Llama's does; eos is ``<|im_end|>``) and a ChatML chat
    template into ``folder``; returns the folder. Needs ``transformers`` (and its ``tokenizers``), no download.
    Weights are drawn with std 0.1 rather than 0.02, so that the next-token distributions are peaked enough
    for greedy decoding to be stable across batch shapes."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[BOS, "<|im_start|>", EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DEMO_PROMPTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    num_heads = max(hidden_size // 32, 2)
    config = transformers.AutoConfig.for_model(
        "qwen3", vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads // 2,
        head_dim=32, max_position_embeddings=max_position_embeddings, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a one-file "shard" needs no progress bar
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return folder


def run_generation(model: str | Path, num_prompts: int = 32, max_tokens: int = 64,
                   device: str = "auto") -> dict:
    """Generates ``max_tokens`` tokens for each of ``num_prompts`` prompts in one batched ``LLM.generate``
    (with its progress bar), prints throughput and two samples, and returns the numbers."""
    from llmfast.engine import LLM, SamplingParams

    llm = LLM(model, device=device)
    prompts: list = [f"{i}. {DEMO_PROMPTS[i % len(DEMO_PROMPTS)]}" for i in range(num_prompts)]
    if llm.tokenizer is None:  # a checkpoint without tokenizer files takes token ids
        prompts = [[(7 * i + j) % llm.vocab_size for j in range(16)] for i in range(num_prompts)]
    # eos is ignored so that every request makes max_tokens tokens (as vLLM's throughput benchmark)
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens, ignore_eos=True, seed=i)
              for i in range(num_prompts)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(out.prompt_token_ids) for out in outputs)
    output_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    print(f"{num_prompts} requests, {prompt_tokens} prompt + {output_tokens} generated tokens in {elapsed:.2f} s: "
          f"{output_tokens / elapsed:.0f} output tok/s, {(prompt_tokens + output_tokens) / elapsed:.0f} total tok/s")
    for out in outputs[:2]:
        print(f"  {out.prompt or out.prompt_token_ids!r} -> {out.outputs[0].text!r}")
    return {"requests": num_prompts, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "seconds": elapsed}


def _cases(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[str], object]]:
    """One representative call per op: name -> fn(backend) -> output tensor(s)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dt)

    tokens, hidden = 256, 1024
    x, r, w, b = rand(tokens, hidden), rand(tokens, hidden), rand(hidden), rand(hidden)
    q, k, v = rand(2, 128, 8, 64), rand(2, 128, 2, 64), rand(2, 128, 2, 64)

    num_blocks, block_size, seqs, context = 64, 16, 4, 100
    k_cache, v_cache = rand(num_blocks, block_size, 2, 64), rand(num_blocks, block_size, 2, 64)
    perm = torch.randperm(num_blocks, generator=g)[: seqs * 8]
    block_tables = perm.view(seqs, 8).to(device=device, dtype=torch.int32)
    context_lens = torch.full((seqs,), context, dtype=torch.int32, device=device)
    q_decode = rand(seqs, 8, 64)
    new_k, new_v = rand(seqs, 2, 64), rand(seqs, 2, 64)
    slots = (block_tables[:, (context - 1) // block_size].long() * block_size + (context - 1) % block_size)

    weight = rand(512, 1024)
    qw = llmfast.quant.quantize(weight, bits=4, group_size=128)
    xq = rand(8, 1024)

    def write(backend):
        kc, vc = k_cache.clone(), v_cache.clone()
        ops.write_kv_cache(new_k, new_v, kc, vc, slots, backend=backend)
        return kc, vc

    return {
        "add_layer_norm": lambda be: ops.add_layer_norm(x, r, w, b, backend=be),
        "add_rms_norm": lambda be: ops.add_rms_norm(x, r, w, backend=be),
        "attention": lambda be: ops.attention(q, k, v, causal=True, backend=be),
        "write_kv_cache": write,
        "paged_attention": lambda be: ops.paged_attention(q_decode, k_cache, v_cache, block_tables, context_lens, backend=be),
        "quant_matmul": lambda be: ops.quant_matmul(xq, qw, backend=be),
    }


def _max_error(out, ref) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, refs))


def _time_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.2) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def run_backend_check(device: torch.device | None = None) -> list[dict]:
    """Rows of (op, backend, max error vs reference, ms); prints nothing."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for op, fn in _cases(device, dtype).items():
        ref = fn("reference")
        for backend in llmfast.available_backends(op):
            try:
                resolve(op, backend, device)
            except llmfast.BackendUnavailable:
                continue  # available on this machine, but not for tensors on this device
            out = fn(backend)
            rows.append({"op": op, "backend": backend, "max_error": _max_error(out, ref),
                         "ms": _time_ms(lambda: fn(backend), device)})
    return rows


def print_backend_table(rows: list[dict]) -> None:
    print(f"{'op':<16} {'backend':<10} {'max |err| vs reference':>24} {'ms':>10}")
    for row in rows:
        print(f"{row['op']:<16} {row['backend']:<10} {row['max_error']:>24.3e} {row['ms']:>10.3f}")


def main(model: str | Path | None = None, num_prompts: int = 32, max_tokens: int = 64,
         device: str = "auto") -> None:
    """Batched generation on ``model`` (default: the embedded tiny checkpoint), then the backend check."""
    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"llmfast {llmfast.__version__} on {name} (torch {torch.__version__})")
    with tempfile.TemporaryDirectory(prefix="llmfast-demo-") as tmp:
        if model is None:
            print("model: a small random Qwen3 with an offline tokenizer (pass --model DIR for a real checkpoint)")
            model = build_tiny_checkpoint(tmp)
        else:
            print(f"model: {model}")
        run_generation(model, num_prompts, max_tokens, device)
    print("\nbackend check: every op on every backend available here, against the reference")
    print_backend_table(run_backend_check(dev))
