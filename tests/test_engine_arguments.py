"""LLM's own arguments on tiny random checkpoints (float32, CPU): refused values and the CPU's default KV
cache size, seed (with distinct request ids), dtype, and int8 / int4 quantization staying close to float."""
import pytest
import torch

from llmfast.engine import LLM, SamplingParams
from engine_setup import MAX_LEN, random_prompts

pytest_plugins = ("engine_setup",)  # its fixtures: tokenizer, checkpoints, llama

pytest.importorskip("transformers")


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


@pytest.mark.parametrize("bits", [4, 8])
def test_int4_names_the_layers_it_cannot_pack(bits):
    """in_features not a multiple of 8 cannot be packed in int4: those layers stay float, with a warning."""
    import warnings

    from llmfast.engine.model_runner import _quantize_linears
    from llmfast.models import MODEL_CLASSES
    from llmfast.nn.quant_linear import QuantLinear

    config = dict(model_type="llama", vocab_size=50, hidden_size=60, intermediate_size=96, num_hidden_layers=1,
                  num_attention_heads=3, num_key_value_heads=1)
    model = MODEL_CLASSES["llama"].from_hf_config(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quantize_linears(model, bits)
    messages = [str(w.message) for w in caught]
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
    if bits == 8:
        assert quantized == 7 and not messages
    else:  # q, k, v, o, gate, up take 60 features; down takes 96
        assert quantized == 1
        assert messages == ["quantization: 6 linear layers kept in full precision: int4 packs 8 input features "
                            "per int32 and their in_features (60) are not multiples of 8"]
