"""The engine loop: requests in, one scheduled forward and one sampled token per running sequence per step,
finished completions out. ``LLM`` (llm.py) adds the user-facing calls on top."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from llmfast.backends import resolve as resolve_backend
from llmfast.device import on_device, resolve_device
from llmfast.engine.block_manager import BlockManager
from llmfast.engine.detokenizer import Detokenizer, load_tokenizer
from llmfast.engine.model_runner import QUANT_BITS, ModelRunner
from llmfast.engine.outputs import CompletionOutput
from llmfast.engine.sampler import Sampler
from llmfast.engine.sampling_params import SamplingParams
from llmfast.engine.scheduler import Scheduler
from llmfast.engine.sequence import Sequence
from llmfast.models.loader import read_json_object
from llmfast.ops._checks import check_positive_int

# the llmfast ops a model forward calls (quant_matmul too for a quantized model)
ENGINE_OPS = ("add_rms_norm", "add_layer_norm", "attention", "write_kv_cache", "paged_attention")


def _eos_token_ids(path: Path, tokenizer) -> set[int]:
    """The generation config's eos ids (config.json's when it has none) and the tokenizer's."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            eos = read_json_object(file).get("eos_token_id")
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
                break
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# generation_config.json field -> SamplingParams field: what vLLM takes from it (generation_config="auto")
GENERATION_DEFAULTS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def _sampling_defaults(path: Path) -> dict:
    """The ``SamplingParams`` fields the checkpoint's generation_config.json sets (as vLLM, ``do_sample`` is
    not read: a config with a temperature samples). Raises ValueError naming the file for a bad value."""
    file = path / "generation_config.json"
    config = read_json_object(file) if file.is_file() else {}
    defaults = {ours: config[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if config.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        raise ValueError(f"model: {file}: {exc}") from None
    return defaults


def encode_text(tokenizer, text: str, name: str, add_special_tokens: bool = True) -> list[int]:
    """The token ids of a text prompt; a ValueError naming ``name`` when it cannot be tokenized. An empty
    text is tokenized too (a tokenizer may add a bos token to it, as vLLM reads it); no tokens is refused
    later, with token-id prompts."""
    if tokenizer is None:
        raise ValueError(f"{name}: a text prompt needs a tokenizer, and the checkpoint has none; "
                         "pass token ids instead")
    try:  # JSON and Python strings can hold lone surrogates, which no tokenizer can encode
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name}: the text is not valid Unicode: a lone surrogate {text[exc.start]!r} at "
                         f"character {exc.start}") from None
    return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


class LLMEngine:
    def __init__(self, model: str | Path, dtype="auto", device="auto", quantization: str | None = None,
                 block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 gpu_memory_utilization: float = 0.9, num_kv_blocks: int | None = None,
                 enforce_eager: bool = False, seed: int = 0):
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            check_positive_int(name, value)
        check_positive_int("num_kv_blocks", num_kv_blocks, allow_none=True)
        if quantization is not None and quantization not in QUANT_BITS:
            raise ValueError(f"quantization: expected None or one of {sorted(QUANT_BITS)}, got {quantization!r}")
        if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float)) \
                or not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: expected a fraction in (0, 1], got {gpu_memory_utilization!r}")
        if not isinstance(enforce_eager, bool):
            raise ValueError(f"enforce_eager: expected a bool, got {enforce_eager!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        if not isinstance(model, (str, Path)) or not Path(model).is_dir():
            # an OSError, as transformers' and vLLM's loaders raise for a missing checkpoint
            raise FileNotFoundError(f"model: expected a local checkpoint folder, got {model!r} (nothing is downloaded)")
        self.sampling_defaults = _sampling_defaults(Path(model))  # SamplingParams fields from generation_config.json
        self.device = resolve_device(device)
        for op in ENGINE_OPS + (("quant_matmul",) if quantization else ()):  # LLMFAST_BACKEND fails here, not mid-request
            resolve_backend(op, "auto", self.device)
        self.sampler = Sampler(self.device, seed)
        with on_device(self.device):
            self.runner = ModelRunner(model, dtype=dtype, device=self.device, quantization=quantization,
                                      block_size=block_size, num_kv_blocks=num_kv_blocks,
                                      gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager,
                                      sampler=self.sampler)
        self.tokenizer = load_tokenizer(model)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.eos_token_ids = _eos_token_ids(Path(model), self.tokenizer)
        self.vocab_size = self.runner.vocab_size
        # a sequence must fit in the cache on its own, or preempting the others could not make room for it
        self.kv_capacity = self.runner.num_kv_blocks * block_size
        self.max_model_len = min(self.runner.max_model_len, self.kv_capacity)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self._request_ids = itertools.count()

    def encode(self, text: str, name: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of a text prompt (``encode_text`` with the engine's tokenizer)."""
        return encode_text(self.tokenizer, text, name, add_special_tokens)

    def add_request(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams) -> list[Sequence]:
        """Queues the ``params.n`` sequences of one (validated) request."""
        request_id = str(next(self._request_ids))
        seqs = []
        for index in range(params.n):
            generator = None
            if params.seed is not None:  # sibling i gets seed + i, as vLLM's n > 1
                generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            seqs.append(Sequence(request_id, index, prompt_token_ids, params, generator, prompt))
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def abort(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)

    def step(self) -> None:
        """Runs one scheduled forward, then samples the next token of each sequence it completed."""
        with on_device(self.device):  # the server steps on a worker thread, whose current GPU is 0
            self._step()

    def _step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch:
            raise RuntimeError("the scheduler found nothing to run although requests are unfinished: "
                               f"{len(self.scheduler.waiting)} waiting, {len(self.scheduler.running)} running")
        try:  # the sampler too: on a GPU an asynchronous error surfaces at its first sync
            logits, sampled = self.runner.run(batch)
            out = self.sampler(logits, sampled, self.eos_token_ids) if sampled else None
        except BaseException:
            self.scheduler.requeue(batch)
            raise
        for seq, num_new in batch:
            seq.num_computed_tokens += num_new
        if sampled:
            for seq, token, logprob, top in zip(sampled, out.token_ids, out.logprobs, out.top_logprobs):
                if top is not None:
                    for token_id, entry in top.items():
                        entry.decoded_token = self.detokenizer.token_text(token_id)
                seq.append_token(token, logprob, top)
                self._check_finished(seq, token)

    def _check_finished(self, seq: Sequence, token: int) -> None:
        """Detokenises the new token and ends ``seq`` on eos, a stop token or string, or its length limit."""
        p = seq.params
        finish, reason = None, None
        may_stop = seq.num_output_tokens >= p.min_tokens
        if may_stop and not p.ignore_eos and token in self.eos_token_ids:
            finish = "stop"
        elif may_stop and token in p.stop_token_ids:
            finish, reason = "stop", token
        stopped_by_token = finish is not None
        if finish is None and (seq.num_tokens >= self.max_model_len
                               or (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)):
            finish = "length"
        # the eos or stop token stays in token_ids but not in the text
        piece = self.detokenizer.update(seq, seq.num_tokens - stopped_by_token, final=finish is not None)
        if piece and p.stop and may_stop:
            stop = self.detokenizer.find_stop_string(seq, len(piece))
            if stop is not None:
                finish, reason = "stop", stop
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish, reason
            self.scheduler.finish(seq)

    @staticmethod
    def completion(seq: Sequence) -> CompletionOutput:
        return CompletionOutput(
            index=seq.index, text=seq.text, token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=None if seq.logprobs is None else list(seq.logprobs),
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        )
