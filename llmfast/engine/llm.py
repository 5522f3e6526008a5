"""vLLM's offline API: ``LLM(model).generate(prompts, SamplingParams(...))``, ``stream`` and ``beam_search``."""
from __future__ import annotations

import time
from typing import Iterator, Sequence as Seq

from llmfast.engine.beam_search import run_beam_search
from llmfast.engine.llm_engine import LLMEngine
from llmfast.engine.outputs import BeamSearchOutput, CompletionOutput, RequestOutput
from llmfast.engine.sampling_params import BeamSearchParams, SamplingParams
from llmfast.engine.sequence import Sequence

PromptType = str | list[int] | dict


class LLM(LLMEngine):
    """An engine over a local Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files).

    ``LLM(model, dtype="auto", device="auto", quantization=None, block_size=16, max_num_seqs=256,
    max_num_batched_tokens=8192, gpu_memory_utilization=0.9, num_kv_blocks=None, enforce_eager=False,
    seed=0)``: ``quantization`` "int8" or "int4" quantizes the linear layers (weight-only); the KV cache
    has ``num_kv_blocks`` blocks of ``block_size`` tokens (default: sized from free GPU memory, at most
    4 GiB on CPU). A sequence can never be longer than the model's maximum length, nor than the cache, nor
    than a sliding window in its config (llmfast's attention has none: a prompt past it is refused and
    generation ends there with finish_reason "length").
    """

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``sampling_params=None`` means: ``SamplingParams()`` with the fields the checkpoint's
        generation_config.json sets (temperature, top_k, top_p, min_p, repetition_penalty, and max_new_tokens
        as max_tokens), as vLLM's ``generation_config="auto"``."""
        return SamplingParams(**self.sampling_defaults)

    def generate(self, prompts: PromptType | Seq[PromptType], sampling_params: SamplingParams | Seq[SamplingParams]
                 | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Completes every prompt (a string, a list of strings, or a list of token-id lists) and returns
        one ``RequestOutput`` per prompt, in prompt order. Every input is checked before anything runs."""
        requests = self.check_requests(self._parse_prompts(prompts), sampling_params)
        seqs: list[list[Sequence]] = []
        try:
            for text, ids, params in requests:
                seqs.append(self.add_request(text, ids, params))
            self._run(seqs, use_tqdm)
        finally:  # an interrupted call leaves nothing queued behind it
            self.abort([s for group in seqs for s in group])
        return [self._request_output(group) for group in seqs]

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[CompletionOutput]:
        """Yields the new piece of the request's completions after each step that extended them: ``text``
        and ``token_ids`` hold only what is new; the last output of each completion has ``finish_reason``.
        Text that might begin a stop string is held back until it is known not to."""
        if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], int):
            raise ValueError("prompt: stream() takes one prompt (a string, token ids or a dict), got a list of them")
        ((text, ids, params),) = self.check_requests(self._parse_prompts(prompt), sampling_params)
        return self._stream(text, ids, params)  # checked now, queued once iterated

    def _stream(self, text: str | None, ids: list[int], params: SamplingParams) -> Iterator[CompletionOutput]:
        seqs = self.add_request(text, ids, params)
        done: set[int] = set()
        try:
            while True:
                for seq in seqs:  # (another call may have run the request meanwhile)
                    if seq.seq_id not in done and (delta := self.delta(seq)) is not None:
                        if delta.finished():
                            done.add(seq.seq_id)
                        yield delta
                if len(done) == len(seqs):
                    return
                if not all(seq.is_finished for seq in seqs):
                    self.step()
        finally:  # the caller stopped early: free what the request holds
            self.abort(seqs)

    def beam_search(self, prompts: PromptType | Seq[PromptType], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """vLLM's beam search over each prompt; ``.sequences`` best first (see ``BeamSearchParams``)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params: expected a BeamSearchParams, got {type(params).__name__}")
        requests = self.check_requests(self._parse_prompts(prompts), SamplingParams(max_tokens=1))
        return run_beam_search(self, [ids for _, ids, _ in requests], params)

    def get_tokenizer(self):
        return self.tokenizer

    def _run(self, seqs: list[list[Sequence]], use_tqdm: bool) -> None:
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc="Processed prompts", dynamic_ncols=True)
        start = drawn = time.perf_counter()
        done = 0
        while not all(s.is_finished for group in seqs for s in group):
            self.step()
            if bar is None:
                continue
            now = time.perf_counter()
            finished = [group for group in seqs if all(s.is_finished for s in group)]
            prompt_tokens = sum(group[0].num_prompt_tokens for group in finished)  # vLLM counts finished prompts
            output_tokens = sum(s.num_output_tokens for group in seqs for s in group)
            # set before update, so that a redraw by update shows this step's rate, not the last one's
            bar.set_postfix_str(f"est. speed input: {prompt_tokens / (now - start):.0f} toks/s, "
                                f"output: {output_tokens / (now - start):.0f} toks/s", refresh=False)
            if len(finished) > done:
                bar.update(len(finished) - done)
                done = len(finished)
            # equal-length requests all finish at the end: without a timed redraw the bar would sit at 0/N
            if now - drawn >= 0.5:
                bar.refresh()
                drawn = now
        if bar is not None:
            bar.close()

    def _request_output(self, group: list[Sequence]) -> RequestOutput:
        first = group[0]
        return RequestOutput(
            request_id=first.request_id, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
            outputs=[self.completion(seq) for seq in sorted(group, key=lambda s: s.index)],
            finished=all(s.is_finished for s in group),
        )

    def delta(self, seq: Sequence) -> CompletionOutput | None:
        """What ``seq`` produced since the last call, or None when nothing (and it is not finished)."""
        start = seq.num_prompt_tokens + seq.num_streamed_tokens
        new_tokens = seq.token_ids[start:]
        if not new_tokens and not seq.is_finished:
            return None
        hold = 0 if seq.is_finished else max((len(s) - 1 for s in seq.params.stop), default=0)
        end = max(len(seq.text) - hold, seq.num_streamed_chars)
        text = seq.text[seq.num_streamed_chars:end]
        logprobs = None if seq.logprobs is None else seq.logprobs[seq.num_streamed_tokens:]
        seq.num_streamed_tokens += len(new_tokens)
        seq.num_streamed_chars = end
        return CompletionOutput(index=seq.index, text=text, token_ids=new_tokens,
                                cumulative_logprob=seq.cumulative_logprob, logprobs=logprobs,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

    def _parse_prompts(self, prompts) -> list[tuple[str | None, list[int]]]:
        """``(text or None, token ids)`` of each prompt; strings are tokenized here."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts: expected a string, a list of strings or a list of token-id lists, "
                             f"got {prompts!r}")
        parsed = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, dict):  # vLLM's TextPrompt / TokensPrompt
                prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
            if isinstance(prompt, str):
                parsed.append((prompt, self.encode(prompt, f"prompts[{i}]")))
            elif isinstance(prompt, (list, tuple)):
                parsed.append((None, list(prompt)))
            else:
                raise ValueError(f"prompts[{i}]: expected a string or a list of token ids, got {type(prompt).__name__}")
        return parsed

    def check_requests(self, prompts, sampling_params) -> list[tuple[str | None, list[int], SamplingParams]]:
        """Validates parsed prompts and their sampling params before anything runs (ValueError naming the
        prompt); returns (text or None, token ids, params) per prompt. The server admits requests through it."""
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if not isinstance(sampling_params, (list, tuple)) or len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: expected one SamplingParams or a list of {len(prompts)} "
                             f"(one per prompt), got {sampling_params!r}")
        for i, ((_, ids), params) in enumerate(zip(prompts, sampling_params)):
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling_params[{i}]: expected a SamplingParams, got {type(params).__name__}")
            try:
                params.verify()
            except ValueError as exc:
                raise ValueError(f"sampling_params[{i}].{exc}") from None
            if not ids:
                raise ValueError(f"prompts[{i}]: the prompt is empty")
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompts[{i}]: token ids must be ints in [0, {self.vocab_size}) (the vocabulary), "
                                 f"got {bad[:5]}")
            if len(ids) > self.max_model_len:
                raise ValueError(f"prompts[{i}]: {len(ids)} tokens, more than the {self.max_model_len} this engine "
                                 f"allows ({self.runner.max_model_len_source}, the KV cache's "
                                 f"{self.kv_capacity} slots)")
            if params.stop and self.tokenizer is None:
                raise ValueError(f"sampling_params[{i}].stop: stop strings need a tokenizer, and the checkpoint "
                                 "has none; use stop_token_ids")
        return [(text, ids, params) for (text, ids), params in zip(prompts, sampling_params)]
