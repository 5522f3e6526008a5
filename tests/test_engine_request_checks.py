"""LLM.generate's input checks on tiny random checkpoints (float32, CPU): bad prompts and sampling params
(also ones changed after construction) raise before anything runs, and token prompts need no tokenizer."""
import pytest

from llmfast.engine import LLM, SamplingParams
from engine_setup import GREEDY, MAX_LEN, hf_greedy

pytest_plugins = ("engine_setup",)  # its fixtures: tokenizer, checkpoints, llama

pytest.importorskip("transformers")


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
