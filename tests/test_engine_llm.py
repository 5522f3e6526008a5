"""LLM end to end on tiny random checkpoints (float32, CPU) against Hugging Face transformers: greedy
tokens equal ``generate(do_sample=False)`` for every family, also under preemption, chunked prefill and
shared prefixes; generation-config defaults, min_tokens, logprobs, beam search, streaming, n > 1 and input
checks (the text, stops and detokenisation: test_engine_text.py)."""
import json
import shutil
import threading
import traceback

import pytest
import torch

from llmfast.engine import LLM, BeamSearchParams, SamplingParams
from llmfast.ops._checks import trusted_index_values, values_readable
from engine_setup import FAMILIES, GREEDY, MAX_LEN, MAX_TOKENS, PROMPT_LENGTHS, hf_greedy, random_prompts

pytest_plugins = ("engine_setup",)  # its fixtures: tokenizer, checkpoints, llama

transformers = pytest.importorskip("transformers")


SCENARIOS = {  # engine arguments, prompts
    "default": (dict(), dict(lengths=PROMPT_LENGTHS)),
    "preemption": (dict(num_kv_blocks=24, block_size=4), dict(lengths=PROMPT_LENGTHS)),
    "chunked": (dict(max_num_batched_tokens=7, block_size=8), dict(lengths=PROMPT_LENGTHS)),
    "shared_prefix": (dict(block_size=4, num_kv_blocks=48), dict(lengths=[1, 3, 9, 20], prefix=range(5, 30))),
}



@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf(checkpoints, family, scenario):
    folder, hf = checkpoints(family)
    engine_args, prompt_args = SCENARIOS[scenario]
    llm = LLM(folder, device="cpu", **engine_args)
    prompts = random_prompts(vocab=llm.vocab_size, **prompt_args)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt)[0], f"prompt of {len(prompt)} tokens"
        assert out.outputs[0].finish_reason == "length"
    if scenario == "preemption":
        assert llm.scheduler.num_preemptions > 0
    if scenario == "shared_prefix":
        assert llm.block_manager.num_hit_blocks >= 3 * (25 // 4)
    assert llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks and not llm.scheduler.has_unfinished()


def test_no_sampling_params_takes_the_generation_config_defaults(checkpoints, tmp_path, tokenizer):
    """sampling_params=None: SamplingParams with generation_config.json's sampling fields, as vLLM; here a
    greedy one with a repetition penalty, which HF's generate applies too (it was ignored)."""
    folder, hf = checkpoints("llama")
    shutil.copytree(folder, tmp_path / "model")
    config = {"eos_token_id": tokenizer.eos_token_id, "temperature": 0.0, "repetition_penalty": 1.5,
              "max_new_tokens": 7, "do_sample": False}
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps(config))
    llm = LLM(tmp_path / "model", device="cpu", num_kv_blocks=64)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.repetition_penalty, defaults.max_tokens) == (0.0, 1.5, 7)
    prompt = random_prompts([6], llm.vocab_size, seed=13)[0]
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=7, repetition_penalty=1.5,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=0)[0, len(prompt):].tolist()
    assert llm.generate([prompt], use_tqdm=False)[0].outputs[0].token_ids == expected
    assert expected != hf_greedy(hf, prompt, 7)[0]  # the penalty changed the tokens
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"top_p": 5.0}))
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        LLM(tmp_path / "model", num_kv_blocks=64)


def test_beam_search_with_eos_length_penalty_and_ignore_eos(llama, tmp_path, checkpoints):
    """With an eos the beams meet: finished beams rank by cum_logprob / len ** length_penalty (vLLM's
    formula, a final eos not counted); ignore_eos=True grows every beam to max_tokens."""
    from llmfast.engine.beam_search import beam_score

    llm, _ = llama
    prompt = random_prompts([7], llm.vocab_size, seed=15)[0]
    greedy = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    folder = tmp_path / "eos"
    shutil.copytree(checkpoints("llama")[0], folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": greedy[1]}))
    eos_llm = LLM(folder, device="cpu", num_kv_blocks=128)
    for penalty in (0.0, 1.0, 2.0):
        beams = eos_llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=6,
                                                               length_penalty=penalty))[0].sequences
        assert any(b.finish_reason == "stop" and b.tokens[-1] == greedy[1] for b in beams)
        scores = [beam_score(b, eos_llm.eos_token_ids, penalty) for b in beams]
        assert scores == sorted(scores, reverse=True)
    beams = eos_llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))[0].sequences
    assert all(len(b.tokens) == len(prompt) + 6 and b.finish_reason == "length" for b in beams)
    assert any(greedy[1] in b.tokens[len(prompt):] for b in beams)


def test_beams_that_reach_the_maximum_length_finish_with_length(checkpoints, tmp_path):
    """A beam stopped by the model's length (16 here) before max_tokens ends with "length" (it had None)."""
    folder = tmp_path / "short"
    shutil.copytree(checkpoints("llama")[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    llm = LLM(folder, device="cpu", block_size=4, num_kv_blocks=32)
    assert llm.max_model_len == 16
    prompt = random_prompts([14], llm.vocab_size, seed=16)[0]
    beams = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True))[0].sequences
    assert len(beams) == 2 and all(len(b.tokens) == 16 for b in beams)
    assert [b.finish_reason for b in beams] == ["length", "length"]


def test_min_tokens_defers_stops(llama):
    llm, _ = llama
    prompt = random_prompts([6], llm.vocab_size, seed=4)[0]
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[first],
                                                min_tokens=3), use_tqdm=False)[0].outputs[0]
    assert first not in out.token_ids[:3] and len(out.token_ids) >= 3
    assert out.finish_reason == "length" or (out.token_ids[-1] == first and out.finish_reason == "stop")


def test_logprobs_equal_hf_log_softmax(llama, tokenizer):
    llm, hf = llama
    prompts = random_prompts([5, 30], llm.vocab_size, seed=5)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=4),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        tokens, ref = hf_greedy(hf, prompt, 8)
        completion = out.outputs[0]
        assert completion.token_ids == tokens and len(completion.logprobs) == 8
        for step, entries in enumerate(completion.logprobs):
            assert set(entries) == set(ref[step].topk(4).indices.tolist())
            for token, entry in entries.items():
                assert entry.logprob == pytest.approx(ref[step, token].item(), abs=1e-4)
                assert entry.decoded_token == tokenizer.decode([token], skip_special_tokens=True)
        assert completion.cumulative_logprob == pytest.approx(ref[range(8), tokens].sum().item(), abs=1e-3)


def test_beam_search(llama, tokenizer):
    llm, hf = llama
    prompts = random_prompts([3, 12], llm.vocab_size, seed=6)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    single = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=6))
    for prompt, g, b in zip(prompts, greedy, single):
        assert b.sequences[0].tokens == prompt + g.outputs[0].token_ids
        assert b.sequences[0].cum_logprob == pytest.approx(g.outputs[0].cumulative_logprob, abs=1e-4)
    wide = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=4, length_penalty=0.0))
    for prompt, out in zip(prompts, wide):
        beams = out.sequences
        assert len(beams) == 3 and len({tuple(b.tokens) for b in beams}) == 3
        scores = [b.cum_logprob for b in beams]
        assert scores == sorted(scores, reverse=True)
        for beam in beams:  # each score is the sum of HF's log-probabilities along the beam
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([beam.tokens])).logits[0].float(), dim=-1)
            n = len(prompt)
            expected = sum(ref[i - 1, beam.tokens[i]].item() for i in range(n, len(beam.tokens)))
            assert beam.cum_logprob == pytest.approx(expected, abs=1e-3)
            assert beam.tokens[:n] == prompt and beam.text == tokenizer.decode(beam.tokens)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=10),
], ids=["seeded", "n2"])
def test_stream_equals_generate(llama, params):
    llm, _ = llama
    whole = llm.generate("The quick brown", params, use_tqdm=False)[0].outputs
    pieces = list(llm.stream("The quick brown", params))
    for completion in whole:
        mine = [p for p in pieces if p.index == completion.index]
        assert "".join(p.text for p in mine) == completion.text
        assert [t for p in mine for t in p.token_ids] == completion.token_ids
        assert [p.finish_reason is not None for p in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].finish_reason == completion.finish_reason
        assert mine[-1].cumulative_logprob == pytest.approx(completion.cumulative_logprob, abs=1e-5)
    assert not llm.scheduler.has_unfinished()


def stop_strings_from(llm, prompt, params) -> dict[str, str]:
    """Two stop strings taken from the text ``params`` makes of ``prompt``, each where it first occurs there:
    one inside a token's text (after its first character), one across the boundary of two tokens."""
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    text = out.text
    # a token's span in the text, where its decoded prefixes are prefixes of the text (whole characters)
    prefixes = [llm.tokenizer.decode(out.token_ids[:k]) for k in range(len(out.token_ids) + 1)]
    spans = [(len(a), len(b)) for a, b in zip(prefixes, prefixes[1:]) if text.startswith(a) and text.startswith(b)]
    found = {}
    for start, end in spans:
        for where, stop in (("inside_a_token", text[start + 1:end]), ("across_tokens", text[end - 1:end + 1])):
            begin = start + 1 if where == "inside_a_token" else end - 1
            if len(stop) == 2 and "\ufffd" not in stop and text.find(stop) == begin and begin > 0:
                found.setdefault(where, stop)
    assert set(found) == {"inside_a_token", "across_tokens"}, (text, spans)
    return found


@pytest.mark.parametrize("where", ["inside_a_token", "across_tokens"])
def test_a_stop_string_cuts_the_stream_as_it_cuts_generate(llama, where):
    """A stop string the greedy text holds ends the request there (the string left out of the text), whole or
    streamed; the stream's pieces add up to generate's text and tokens."""
    llm, _ = llama
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate("The quick brown", greedy, use_tqdm=False)[0].outputs[0].text
    stop = stop_strings_from(llm, "The quick brown", greedy)[where]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=["never in the text", stop])
    whole = llm.generate("The quick brown", params, use_tqdm=False)[0].outputs[0]
    assert whole.text == full[:full.index(stop)] and (whole.finish_reason, whole.stop_reason) == ("stop", stop)
    pieces = list(llm.stream("The quick brown", params))
    assert len(pieces) > 1 and "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids and len(whole.token_ids) < 20
    assert (pieces[-1].finish_reason, pieces[-1].stop_reason) == ("stop", stop)
    assert not llm.scheduler.has_unfinished()


def test_progress_bar_shows_the_rate_before_the_last_prompt_finishes(llama, monkeypatch):
    """Equal-length requests all finish on the last step: the bar redraws its tokens/s every 0.5 s anyway
    (here every step is 0.5 s later), not only when a prompt finishes (it sat at 0/3 with no rate)."""
    import io
    import itertools
    import re
    from types import SimpleNamespace

    from tqdm import std

    import llmfast.engine.llm as llm_module

    llm, _ = llama
    out = io.StringIO()
    monkeypatch.setattr("tqdm.auto.tqdm", lambda *args, **kwargs: std.tqdm(*args, file=out, **kwargs))
    clock = itertools.count()
    monkeypatch.setattr(llm_module, "time", SimpleNamespace(perf_counter=lambda: 0.5 * next(clock)))
    llm.generate([[1, 2, 3], [4, 5, 6], [7, 8, 9]], GREEDY, use_tqdm=True)
    renders = [line for line in out.getvalue().split("\r") if " 0/3 " in line]
    assert any(int(rate) > 0 for line in renders for rate in re.findall(r"output: (\d+) toks/s", line)), renders


def test_stream_stopped_early_frees_its_blocks(llama):
    llm, _ = llama
    stream = llm.stream([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.scheduler.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks


def test_seeded_requests_and_n_do_not_depend_on_the_batch(llama):
    llm, _ = llama
    prompt = random_prompts([21], llm.vocab_size, seed=8)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    hits_before = llm.block_manager.num_hit_blocks
    alone = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2]
    assert llm.block_manager.num_hit_blocks - hits_before >= 2 * (20 // 4)  # siblings share the prompt's blocks
    others = random_prompts([4, 40, 9], llm.vocab_size, seed=9)
    mixed = llm.generate([others[0], prompt, others[1], others[2]],
                         [SamplingParams(temperature=0.7), params, SamplingParams(seed=1), GREEDY], use_tqdm=False)
    assert [c.token_ids for c in mixed[1].outputs] == [c.token_ids for c in alone.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1


def test_token_prompts_need_no_tokenizer(checkpoints):
    folder, hf = checkpoints("gpt2")  # saved without tokenizer files
    llm = LLM(folder, device="cpu", num_kv_blocks=32)
    out = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.text == "" and out.token_ids == hf_greedy(hf, [1, 2, 3])[0]
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text", use_tqdm=False)
    with pytest.raises(ValueError, match="stop"):
        llm.generate([[1, 2]], SamplingParams(stop="x"), use_tqdm=False)


@pytest.mark.parametrize("prompts,params,match", [
    ("", None, "empty"),
    ([[]], None, "empty"),
    ([[1, 2, 10_000]], None, "vocabulary"),
    ([[-1]], None, "vocabulary"),
    ([[1] * (MAX_LEN + 1)], None, "maximum length"),
    (["a", "b"], [SamplingParams()], "one per prompt"),
    (["a"], [dict(temperature=0)], "SamplingParams"),
    ([3.5], None, "prompts"),
    (["a\ud800b"], None, "surrogate"),
])
def test_bad_inputs_raise_before_anything_runs(llama, prompts, params, match):
    llm, _ = llama
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine", *prompts] if isinstance(prompts, list) and params is None else prompts, params,
                     use_tqdm=False)
    assert not llm.scheduler.has_unfinished()


@pytest.mark.parametrize("field,value", [("n", 0), ("seed", "x"), ("temperature", -1.0), ("logprobs", 500),
                                         ("stop_token_ids", [-3])])
def test_sampling_params_changed_after_construction_are_checked_again(llama, field, value):
    """A field set after construction (it was used unchecked: n=0 an IndexError, logprobs=500 accepted)."""
    llm, _ = llama
    params = SamplingParams(max_tokens=3)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=rf"sampling_params\[0\]\.{field}: expected"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert not llm.scheduler.has_unfinished()


def test_engine_arguments_are_checked(checkpoints):
    folder, _ = checkpoints("llama")
    for kwargs in (dict(block_size=0), dict(max_num_seqs=0), dict(num_kv_blocks=0), dict(quantization="int3"),
                   dict(gpu_memory_utilization=1.5), dict(device="tpu"), dict(seed="x")):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            LLM(folder, **kwargs)
    for missing in (folder / "missing", str(folder / "config.json"), 3):
        with pytest.raises(FileNotFoundError, match="model: expected a local checkpoint folder"):
            LLM(missing)
    llm = LLM(folder, device="cpu")  # CPU default: sized for max_num_seqs full-length sequences, at most 4 GiB
    assert llm.runner.kv_cache.numel() * llm.runner.kv_cache.element_size() <= 4 << 30
    assert llm.max_model_len == MAX_LEN


def test_a_sliding_window_bounds_the_sequence(tmp_path, tokenizer):
    """llmfast's attention has no sliding-window mask: a Mistral with a window shorter than its maximum
    length equals HF up to the window, ends there with "length", and refuses a longer prompt naming it."""
    config = transformers.AutoConfig.for_model(**dict(FAMILIES["mistral"], sliding_window=8),
                                               vocab_size=len(tokenizer))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path)
    llm = LLM(tmp_path, device="cpu", num_kv_blocks=16)
    prompt = random_prompts([5], llm.vocab_size, seed=11)[0]
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_greedy(hf, prompt, 3)[0] and out.finish_reason == "length"
    with pytest.raises(ValueError, match="sliding window 8"):
        llm.generate([prompt * 2], GREEDY, use_tqdm=False)


def test_engine_seed_request_ids_and_dtype(checkpoints):
    """LLM(seed=) fixes unseeded sampling (same seed, same tokens; another seed, others); request ids are
    distinct strings across calls; dtype= sets the weights' and the KV cache's dtype."""
    folder, _ = checkpoints("llama")
    prompts = random_prompts([4, 6], 400, seed=14)
    sampled = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    engines = [LLM(folder, device="cpu", num_kv_blocks=32, seed=seed) for seed in (1, 1, 2)]
    runs = [[out.outputs[0].token_ids for out in llm.generate(prompts, sampled, use_tqdm=False)] for llm in engines]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    ids = [out.request_id for _ in range(2) for out in engines[0].generate(prompts, sampled, use_tqdm=False)]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 4
    bf16 = LLM(folder, device="cpu", num_kv_blocks=32, dtype="bfloat16")
    assert bf16.runner.model.lm_head.weight.dtype == bf16.runner.kv_cache.dtype == torch.bfloat16
    assert len(bf16.generate(prompts, sampled, use_tqdm=False)[1].outputs[0].token_ids) == 8


@pytest.mark.parametrize("quantization,tolerance", [("int8", 0.02), ("int4", 0.3)])
def test_quantized_engine_stays_close_to_float(checkpoints, quantization, tolerance):
    from llmfast.nn.quant_linear import QuantLinear

    folder, _ = checkpoints("qwen2")
    prompts = random_prompts([9, 20], 400, seed=10)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    reference = LLM(folder, device="cpu", num_kv_blocks=32).generate(prompts, params, use_tqdm=False)
    llm = LLM(folder, device="cpu", quantization=quantization, num_kv_blocks=32)
    assert any(isinstance(m, QuantLinear) for m in llm.runner.model.modules())
    for ref, out in zip(reference, llm.generate(prompts, params, use_tqdm=False)):
        ref, out = ref.outputs[0], out.outputs[0]
        assert len(out.token_ids) == 6 and out.token_ids[0] == ref.token_ids[0]
        first = ref.token_ids[0]
        assert out.logprobs[0][first].logprob == pytest.approx(ref.logprobs[0][first].logprob, abs=tolerance)


def test_a_failed_step_leaves_no_uncomputed_block_in_the_prefix_cache(checkpoints, monkeypatch):
    folder, hf = checkpoints("llama")
    llm = LLM(folder, device="cpu", block_size=4, num_kv_blocks=256)  # its own: the NaN fill would poison a shared prefix cache
    prompts = random_prompts([3, 6], llm.vocab_size, seed=12, prefix=range(40, 60))
    llm.runner.kv_cache.fill_(float("nan"))  # a block read before it is written poisons the output
    real_run = llm.runner.run

    def interrupted(batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not llm.scheduler.has_unfinished() and llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks
    monkeypatch.setattr(llm.runner, "run", real_run)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p)[0] for p in prompts]


def test_a_failed_sampling_puts_its_batch_back_to_be_recomputed(llama, monkeypatch):
    llm, hf = llama
    prompt = random_prompts([7], llm.vocab_size, seed=13)[0]
    real_sampler = llm.sampler
    calls = []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 2:  # the first decode step
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_sampler(*args)

    monkeypatch.setattr(llm, "sampler", fails_once)
    seq, = llm.add_request(None, prompt, GREEDY)
    failures = 0
    for _ in range(4 * MAX_TOKENS):
        if not llm.scheduler.has_unfinished():
            break
        try:
            llm.step()
        except RuntimeError:
            failures += 1
            assert seq.num_computed_tokens == 0 and llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks
    assert failures == 1 and seq.output_token_ids == hf_greedy(hf, prompt)[0]


def test_an_interrupt_while_queueing_leaves_nothing_queued(llama, monkeypatch):
    llm, _ = llama
    real_add = llm.add_request
    calls = []

    def add_then_interrupt(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_add(*args)

    monkeypatch.setattr(llm, "add_request", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2], [3, 4], [5, 6]], GREEDY, use_tqdm=False)
    assert not llm.scheduler.has_unfinished() and llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks


def test_stream_resumes_after_another_call_finished_its_request(llama):
    llm, _ = llama
    stream = llm.stream([9, 8, 7], GREEDY)
    first = next(stream)
    llm.generate([[1, 2]], GREEDY, use_tqdm=False)  # runs the streamed request to its end as well
    rest = list(stream)
    whole = llm.generate([[9, 8, 7]], GREEDY, use_tqdm=False)[0].outputs[0]
    assert first.token_ids + [t for p in rest for t in p.token_ids] == whole.token_ids
    assert rest[-1].finish_reason == "length"


def test_trusted_index_values_read_nothing_back_and_keep_the_tokens(checkpoints, monkeypatch):
    """The engine's eager path on a GPU, run here: the ops trust the runner's indices, so no check reads a
    value back to the host (each read would be a device sync per layer), through chunked prefill,
    preemption and decode, and the greedy tokens stay HF's. (The CPU's prefill runs the reference
    attention, which reads cu_seqlens to loop over the sequences; a GPU runs the Triton kernel.)"""
    folder, hf = checkpoints("llama")
    llm = LLM(folder, device="cpu", block_size=4, num_kv_blocks=24, max_num_batched_tokens=7)
    llm.runner.check_index_values = False  # as on CUDA
    reads, trusted = [], []
    for method in ("tolist", "item", "__int__", "__bool__"):
        original = getattr(torch.Tensor, method)

        def recording(self, *args, _original=original, _method=method):
            caller = next((f for f in reversed(traceback.extract_stack()) if "/llmfast/" in f.filename), None)
            if not values_readable() and caller and not caller.name.endswith("_reference"):
                reads.append(f"{_method} in {caller.name} ({caller.filename}:{caller.lineno})")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, recording)
    forward = llm.runner.model.forward

    def spy(*args, **kwargs):
        trusted.append(not values_readable())
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm.runner.model, "forward", spy)
    prompts = random_prompts(PROMPT_LENGTHS, llm.vocab_size)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p)[0] for p in prompts]
    assert trusted and all(trusted) and llm.scheduler.num_preemptions > 0
    assert reads == []


def test_trusted_index_values_hold_on_their_own_thread_only():
    seen = []
    with trusted_index_values():
        worker = threading.Thread(target=lambda: seen.append(values_readable()))
        worker.start()
        worker.join()
        assert not values_readable()
    assert values_readable() and seen == [True]
