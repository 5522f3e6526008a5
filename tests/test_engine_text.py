"""The engine's text: incremental detokenisation, stop tokens and eos, stop strings, and tokens that end
inside a multi-byte character, on tiny random checkpoints against Hugging Face's tokenizer and generate."""
import json
import shutil

import pytest
import torch

from llmfast.engine import LLM, SamplingParams
from engine_setup import GREEDY, MAX_TOKENS, hf_greedy, random_prompts

pytest_plugins = ("engine_setup",)  # its fixtures: tokenizer, checkpoints, llama

transformers = pytest.importorskip("transformers")


def test_text_prompts_and_incremental_detokenisation(llama, tokenizer):
    llm, hf = llama
    prompts = ["The quick brown fox", "Héllo wörld", "A"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=True)
    for prompt, out in zip(prompts, outs):
        assert out.prompt == prompt and out.prompt_token_ids == tokenizer(prompt).input_ids
        completion = out.outputs[0]
        assert completion.token_ids == hf_greedy(hf, out.prompt_token_ids, 20)[0]
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_stop_token_ids_and_eos_end_a_request(llama, tmp_path, checkpoints):
    llm, hf = llama
    prompt = random_prompts([10], llm.vocab_size, seed=3)[0]
    full = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    stop = full.token_ids[4]
    cut = full.token_ids.index(stop)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[:cut + 1] and out.finish_reason == "stop" and out.stop_reason == stop
    # the same token as the checkpoint's eos: it ends the request unless ignore_eos
    folder = tmp_path / "eos"
    shutil.copytree(checkpoints("llama")[0], folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    eos_llm = LLM(folder, device="cpu", num_kv_blocks=64)
    out = eos_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[:cut + 1] and out.finish_reason == "stop" and out.stop_reason is None
    assert eos_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == full.token_ids


def test_stop_strings_cut_the_text(llama):
    llm, _ = llama
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0]
    text = full.text
    start = next(i for i in range(3, len(text) - 3) if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip())
    stop = text[start:start + 3]
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                            stop=["@@never@@", stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert full.token_ids[:len(out.token_ids)] == out.token_ids and len(out.token_ids) < len(full.token_ids)


@pytest.fixture(scope="module")
def repeating(tmp_path_factory, tokenizer):
    """``token -> LLM`` over a GPT-2 checkpoint that predicts ``token`` at every step, whatever the input."""
    def build(token):
        folder = tmp_path_factory.mktemp("repeating")
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                         eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(config).eval()
        with torch.no_grad():  # the final norm outputs a constant: the logits of `token` lead by far
            hf.transformer.ln_f.weight.zero_()
            hf.transformer.ln_f.bias.copy_(hf.transformer.wte.weight[token] * 50)
        hf.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return LLM(folder, device="cpu", num_kv_blocks=16)

    return build


def test_text_of_tokens_that_each_end_inside_a_character(repeating, tokenizer):
    """A byte-level token such as 'H' + the first byte of 'é' decodes to 'H\ufffd' even when repeated; its
    text must not wait for a character that never ends (it was all held back and lost, and a stop string
    in it never fired)."""
    token = next(t for t in range(len(tokenizer)) if len(tokenizer.decode([t])) > 1
                 and tokenizer.decode([t, t]).endswith("\ufffd") and not tokenizer.decode([t])[0] == "\ufffd")
    text = tokenizer.decode([token])
    llm = repeating(token)
    params = SamplingParams(temperature=0, max_tokens=6)
    out = llm.generate("The quick", params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [token] * 6 and out.text == tokenizer.decode([token] * 6)
    assert "".join(piece.text for piece in llm.stream("The quick", params)) == out.text
    assert [p.text for p in llm.stream("The quick", params)][0] == text.rstrip("\ufffd")  # not held back
    stopped = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=6, stop=[text[0]]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == [token] and stopped.text == "" and stopped.finish_reason == "stop"


def test_the_earliest_stop_string_cuts_the_text(repeating, tokenizer):
    """One token completing two stop strings: the text is cut before the earlier one in the text, whatever
    their order in the list (it was cut at the first listed, leaving the other in the text)."""
    token = next(t for t in range(len(tokenizer)) if t not in tokenizer.all_special_ids
                 and len(set(tokenizer.decode([t]).strip())) >= 3)
    text = tokenizer.decode([token])
    first, last = text.strip()[0], text.strip()[-1]
    out = repeating(token).generate([[5, 6]], SamplingParams(temperature=0, max_tokens=4, stop=[last, first]),
                                    use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [token] and out.stop_reason == first and out.text == text[:text.index(first)]
