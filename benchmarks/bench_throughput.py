"""End-to-end generation throughput of ``llmfast.LLM`` against Hugging Face transformers ``generate``.

    python -m benchmarks.bench_throughput             # GPU: (a), (b), (c) -> results/{gpu}_throughput.json, .png
    python -m benchmarks.bench_throughput --parts b   # GPU: one part (-> {gpu}_throughput_b.*)
    python -m benchmarks.bench_throughput             # CPU: the small-model comparison -> results/cpu_throughput.*
    python -m benchmarks.bench_throughput --quick     # a tiny smoke run, results to a temp folder

GPU parts, all on random weights in bfloat16 (configs copied from the public config.json files):
(a) nano-vllm's workload: a Qwen3-0.6B-shaped model, 256 requests with prompt and output lengths uniform
    in 100..1024, ignore_eos; output tokens/s.
(b) a Llama-3.2-1B-shaped model, fixed lengths (batch 64: 128 + 128 new; batch 256: 256 + 256), against
    HF ``generate`` on the same requests: its default (dynamic cache, no compilation) and its static cache
    with ``torch.compile`` (``cache_implementation="static"`` + ``compile_config``).
(c) batch-1 decode tokens/s on (b)'s model in bf16, int8 and int4 against the bandwidth roofline: the
    bytes a decode step reads (its weights) over this GPU's measured copy rate ("roofline_tb_s" says which
    rate it used; 3.0 TB/s, the H100's, where none was measured), and, for BENCHMARKS.md, over the H100's
    3.0 TB/s ("h100_roofline_tok_s").
CPU: a small Llama-shaped float32 model, 32 requests of mixed lengths, against HF ``generate`` run one
request at a time and as one left-padded batch (the better of the two is the peer); greedy tokens compared.
Every timing is the median of ``--repeats`` runs, the systems interleaved so a slow spell hits each of them.
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmfast.engine import LLM, SamplingParams
from . import common
from .common import COPY_TB_S, default_device, measure_copy_tb_s, plot_bars, print_table, save_results

# public config.json of Qwen/Qwen3-0.6B (nano-vllm's benchmark model)
QWEN3_0_6B = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)
# public config.json of meta-llama/Llama-3.2-1B
LLAMA_3_2_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                    rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                      original_max_position_embeddings=8192, rope_type="llama3"))
# the CPU comparison: small but shaped like a real decoder (Llama-2 vocabulary, GQA, SwiGLU)
CPU_SMALL = dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
QUICK_TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

Request = tuple[list[int], int]  # (prompt token ids, output tokens)


def build_checkpoint(config: dict, folder: Path, dtype: torch.dtype) -> Path:
    """Saves a random-weight HF model of ``config`` to ``folder`` (no eos: every request runs to its length)."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config, eos_token_id=None, bos_token_id=None,
                                                  initializer_range=0.05, dtype=dtype)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    return folder


def random_requests(num: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int], vocab: int,
                    seed: int = 0, token_seed: int = 0) -> list[Request]:
    """``num`` requests whose lengths follow ``seed`` and whose prompt tokens follow ``token_seed``."""
    lengths, tokens = random.Random(seed), random.Random(f"tokens {token_seed}")
    sizes = [(lengths.randint(*prompt_lens), lengths.randint(*output_lens)) for _ in range(num)]
    return [([tokens.randrange(vocab) for _ in range(p)], n) for p, n in sizes]


def timed(fn, device: torch.device):
    """``(seconds, fn())``, the device synchronised on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def run_llmfast(llm: LLM, requests: list[Request]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    outs = llm.generate([ids for ids, _ in requests], params, use_tqdm=False)
    return [out.outputs[0].token_ids for out in outs]


def run_hf_batched(hf, requests: list[Request], **generate_kwargs) -> list[list[int]]:
    """One left-padded ``generate`` over every request, as long as the longest output; each row is then cut
    to its request's length (the rest is HF's cost of batching unequal requests)."""
    device = hf.device
    width = max(len(ids) for ids, _ in requests)
    input_ids = torch.zeros(len(requests), width, dtype=torch.int64)
    mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(requests):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    longest = max(n for _, n in requests)
    out = hf.generate(input_ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=longest,
                      min_new_tokens=longest, pad_token_id=0, **generate_kwargs)
    return [out[row, width:width + n].tolist() for row, (_, n) in enumerate(requests)]


def run_hf_per_request(hf, requests: list[Request]) -> list[list[int]]:
    outs = []
    for ids, n in requests:
        input_ids = torch.tensor([ids], device=hf.device)
        # an explicit mask: without one, generate would take prompt tokens equal to pad_token_id for padding
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=0)
        outs.append(out[0, len(ids):].tolist())
    return outs


def measure(systems: dict, make_requests, repeats: int, device: torch.device, once: tuple[str, ...] = ()) -> list[dict]:
    """Times each ``name -> fn(requests) -> tokens`` system on ``make_requests(seed)``: a warm-up on seed 0
    (compilation, autotuning; its tokens are kept for comparison), then ``repeats`` runs, interleaved, each
    on fresh prompt tokens of the same lengths so that no run reuses another's prefix cache. Systems in
    ``once`` are too slow to repeat: they run once, on seed 0, without warm-up. One row per system."""
    requests = make_requests(0)
    tokens = sum(n for _, n in requests)
    times = {name: [] for name in systems}
    outputs = {}
    for name, fn in systems.items():
        if name in once:
            times[name].append(timed(lambda: outputs.setdefault(name, fn(requests)), device)[0])
        else:
            outputs[name] = fn(requests)
    for run in range(1, repeats + 1):
        fresh = make_requests(run)
        for name, fn in systems.items():
            if name not in once:
                times[name].append(timed(lambda: fn(fresh), device)[0])
    rows = []
    for name, seconds in times.items():
        s = statistics.median(seconds)
        rows.append({"system": name, "requests": len(requests), "output_tokens": tokens, "seconds": s,
                     "seconds_min": min(seconds), "seconds_max": max(seconds), "runs": len(seconds),
                     "tok_s": tokens / s, "tokens": outputs[name]})
        print(f"  {name:34} {s:8.3f} s ({min(seconds):.3f}..{max(seconds):.3f})  {tokens / s:8.0f} tok/s", flush=True)
    return rows


def compare_tokens(rows: list[dict], ours: str) -> None:
    """Adds to each peer row how many requests got exactly our greedy tokens, then drops the token lists."""
    mine = next(r["tokens"] for r in rows if r["system"] == ours)
    for row in rows:
        if row["system"] != ours:
            row["same_tokens"] = sum(a == b for a, b in zip(mine, row["tokens"]))
    for row in rows:
        del row["tokens"]


def release() -> None:
    """Returns the memory of what the caller has just deleted (``del llm`` first: a name still bound,
    also one a lambda captured, keeps an engine and its KV cache alive)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cpu_comparison(folder: Path, make_requests, repeats: int, device: torch.device) -> list[dict]:
    """Ours against HF ``generate`` per request and as a padded batch, on the same requests."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    llm = LLM(folder, device=device, max_num_seqs=len(make_requests(0)))
    per_request = "HF generate, one request at a time"  # several times slower than the padded batch here
    rows = measure({"llmfast LLM.generate": lambda r: run_llmfast(llm, r),
                    "HF generate, padded batch": lambda r: run_hf_batched(hf, r),
                    per_request: lambda r: run_hf_per_request(hf, r)},
                   make_requests, repeats, device, once=(per_request,))
    compare_tokens(rows, "llmfast LLM.generate")
    best_peer = max(r["tok_s"] for r in rows if r["system"] != "llmfast LLM.generate")
    for row in rows:
        row["x_best_hf"] = row["tok_s"] / best_peer
    del hf, llm
    release()
    return rows


def part_a(folder: Path, repeats: int, device: torch.device) -> list[dict]:
    llm = LLM(folder, dtype="bfloat16", device=device, max_num_seqs=256)
    rows = measure({"llmfast": lambda r: run_llmfast(llm, r)},
                   lambda s: random_requests(256, (100, 1024), (100, 1024), QWEN3_0_6B["vocab_size"], token_seed=s),
                   repeats, device)
    del llm
    release()
    for row in rows:
        row.update(part="a", case="nano-vllm: 256 req, 100..1024 in/out")
        del row["tokens"]
    return rows


B_CASES = {"batch 64, 128+128": (64, 128, 128), "batch 256, 256+256": (256, 256, 256)}


def part_b(folder: Path, repeats: int, device: torch.device) -> list[dict]:
    """HF first (both modes, every case), freed before our engine takes its share of the GPU memory."""
    import transformers

    cases = {name: lambda s, b=b, p=p, n=n: random_requests(b, (p, p), (n, n), LLAMA_3_2_1B["vocab_size"], token_seed=s)
             for name, (b, p, n) in B_CASES.items()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    compiled = dict(cache_implementation="static",
                    compile_config=transformers.CompileConfig(fullgraph=True, mode="reduce-overhead"))
    rows = []
    for name, make_requests in cases.items():
        print(f"(b) {name}: HF", flush=True)
        for row in measure({"HF generate (dynamic cache)": lambda r: run_hf_batched(hf, r),
                            "HF generate (static cache + compile)": lambda r: run_hf_batched(hf, r, **compiled)},
                           make_requests, repeats, device):
            rows.append(dict(row, part="b", case=name))
    del hf
    torch._dynamo.reset()  # the compiled generate's graphs and their static cache
    release()
    llm = LLM(folder, dtype="bfloat16", device=device, max_num_seqs=256)
    for name, make_requests in cases.items():
        print(f"(b) {name}: llmfast", flush=True)
        for row in measure({"llmfast": lambda r: run_llmfast(llm, r)}, make_requests, repeats, device):
            rows.append(dict(row, part="b", case=name))
    del llm
    release()
    for name in cases:
        case_rows = [r for r in rows if r["case"] == name]
        compare_tokens(case_rows, "llmfast")
        ours = next(r["tok_s"] for r in case_rows if r["system"] == "llmfast")
        for row in case_rows:
            row["llmfast_x"] = ours / row["tok_s"]  # our speed-up over this system
    return rows


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step must read: every parameter and buffer once, less the embedding table (one row
    of it is read) unless the output head shares it."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    embed = next((m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)  # the tokens'
    if embed is not None and embed.data_ptr() != model.lm_head.weight.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def part_c(folder: Path, repeats: int, device: torch.device) -> list[dict]:
    """Batch-1 decode rate: the time of 1 + 256 new tokens less that of 1 (the prefill and first token), against
    the weight bytes over the measured copy rate (COPY_TB_S without a measurement) and over COPY_TB_S."""
    copy_tb_s = measure_copy_tb_s()
    roofline_tb_s = COPY_TB_S if copy_tb_s is None else copy_tb_s
    where = "measured here" if copy_tb_s is not None else "the H100's: no measurement here"
    print(f"  roofline: weight bytes over {roofline_tb_s:.2f} TB/s ({where}; BENCHMARKS.md: {COPY_TB_S})")
    prompt = random_requests(1, (128, 128), (1, 1), LLAMA_3_2_1B["vocab_size"])[0][0]
    rows = []
    for quantization in (None, "int8", "int4"):
        # batch 1 needs a few blocks, not 90% of the GPU (which the next engine would then not find free)
        llm = LLM(folder, dtype="bfloat16", device=device, quantization=quantization, max_num_seqs=8,
                  num_kv_blocks=64)
        nbytes = decode_weight_bytes(llm.runner.model)
        run = lambda n: run_llmfast(llm, [(prompt, n)])  # noqa: E731
        run(257)
        decode_s = statistics.median(timed(lambda: run(257), device)[0] - timed(lambda: run(1), device)[0]
                                     for _ in range(repeats))
        roofline = roofline_tb_s * 1e12 / nbytes
        rows.append({"part": "c", "case": "batch 1, 128 prompt, 256 decoded",
                     "system": f"llmfast {quantization or 'bf16'}",
                     "weight_bytes": nbytes, "tok_s": 256 / decode_s, "roofline_tb_s": roofline_tb_s,
                     "roofline_tok_s": roofline, "of_roofline": 256 / decode_s / roofline,
                     "h100_roofline_tok_s": COPY_TB_S * 1e12 / nbytes, "copy_tb_s_measured": copy_tb_s})
        print(f"  {rows[-1]['system']:16} {rows[-1]['tok_s']:7.0f} tok/s  roofline {roofline:7.0f} tok/s "
              f"at {roofline_tb_s:.2f} TB/s", flush=True)
        del llm, run
        release()
    return rows


def gpu_panels(rows: list[dict]) -> dict:
    """(a) and (b): one bar per system and case; (c): each weight format against its roofline."""
    panels = {}
    for part, title in (("a", "(a) Qwen3-0.6B shape, nano-vllm workload"), ("b", "(b) Llama-3.2-1B shape vs HF")):
        part_rows = [r for r in rows if r["part"] == part]
        if part_rows:
            cases = list(dict.fromkeys(r["case"] for r in part_rows))
            series = {s: [next((r["tok_s"] for r in part_rows if r["system"] == s and r["case"] == c), None)
                          for c in cases] for s in dict.fromkeys(r["system"] for r in part_rows)}
            panels[title] = (cases, series)
    decode = [r for r in rows if r["part"] == "c"]
    if decode:
        panels["(c) batch-1 decode, Llama-3.2-1B shape"] = (
            [r["system"] for r in decode],
            {"llmfast": [r["tok_s"] for r in decode],
             f"roofline at {decode[0]['roofline_tb_s']:.2f} TB/s": [r["roofline_tok_s"] for r in decode],
             f"roofline at {COPY_TB_S} TB/s (H100)": [r["h100_roofline_tok_s"] for r in decode]})
    return panels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and 8 requests, results to a temp folder")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--parts", default="a,b,c", help="GPU parts to run, comma-separated (default a,b,c)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system (median reported)")
    parser.add_argument("--out-dir", type=common.writable_dir, help="where JSON + PNG go (default benchmarks/results/)")
    parser.add_argument("--threads", type=common.positive_int, help="torch CPU threads (default: torch's own); on a machine "
                        "shared with other jobs, 1 avoids threads waiting on each other at every small op")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"a", "b", "c"}:
        parser.error(f"--parts: expected a comma-separated subset of a,b,c, got {args.parts!r}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive int, got {args.repeats}")
    # the quick model is too small to gain from threads, which only wait on each other when cores are busy
    with common.torch_threads(args.threads or (1 if args.quick else None)):
        name, rows, columns, panels, payload = run(args, device, parts)
    print_table(rows, columns)
    with common.results_dir(common.out_dir(args, "throughput")):
        save_results(name, payload, device=device, packages=("transformers", "llmfast"))
        plot_bars(name, panels, ylabel="output tokens/s", device=device, title=f"generation throughput, {device.type}")
    return 0


def run(args: argparse.Namespace, device: torch.device,
        parts: list[str]) -> tuple[str, list[dict], list[str], dict, dict]:
    """Runs the CPU comparison (or --quick) or the GPU parts; returns (result name, rows, table columns,
    PNG panels, JSON payload)."""
    with tempfile.TemporaryDirectory(prefix="llmfast_bench_ckpt_") as tmp:
        if args.quick or device.type == "cpu":
            config, num, prompt_lens, output_lens = (QUICK_TINY, 8, (4, 32), (4, 16)) if args.quick else \
                (CPU_SMALL, 32, (16, 256), (16, 128))
            make_requests = lambda s: random_requests(  # noqa: E731
                num, prompt_lens, output_lens, config["vocab_size"], token_seed=s)
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
            folder = build_checkpoint(config, Path(tmp) / "model", dtype)
            print(f"llmfast vs HF generate, {num} requests, {config['hidden_size']}-wide "
                  f"{config['num_hidden_layers']}-layer model, {dtype} on {device}", flush=True)
            rows = cpu_comparison(folder, make_requests, 1 if args.quick else args.repeats, device)
            name, columns = "throughput", ["system", "output_tokens", "seconds", "tok_s", "x_best_hf", "same_tokens"]
            panels = {f"output tokens/s, {num} requests of mixed lengths":
                      (["tok/s"], {r["system"]: [r["tok_s"]] for r in rows})}
            payload = {"model": config, "dtype": str(dtype), "cpu_threads": torch.get_num_threads(), "results": rows}
        else:
            rows = []
            for part, config in (("a", QWEN3_0_6B), ("b", LLAMA_3_2_1B)):
                if part in parts or (part == "b" and "c" in parts):
                    build_checkpoint(config, Path(tmp) / part, torch.bfloat16)
            if "a" in parts:
                print("(a) nano-vllm workload", flush=True)
                rows += part_a(Path(tmp) / "a", args.repeats, device)
            if "b" in parts:
                rows += part_b(Path(tmp) / "b", args.repeats, device)
            if "c" in parts:
                print("(c) batch-1 decode", flush=True)
                rows += part_c(Path(tmp) / "b", args.repeats, device)
            # a partial run must not overwrite the full run's results, nor a run of other parts
            name = "throughput" if parts == ["a", "b", "c"] else "throughput_" + "".join(parts)  # e.g. throughput_b
            columns = ["part", "case", "system", "tok_s", "llmfast_x", "same_tokens", "roofline_tb_s", "roofline_tok_s",
                       "of_roofline", "h100_roofline_tok_s"]
            panels = gpu_panels(rows)
            payload = {"models": {"a": QWEN3_0_6B, "b": LLAMA_3_2_1B}, "dtype": "bfloat16", "results": rows}

    return name, rows, columns, panels, payload


if __name__ == "__main__":
    raise SystemExit(main())
