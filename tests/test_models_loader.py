"""llmfast.models.load_model: sharded checkpoints, tied and untied embeddings, dtype conversion, and the
errors that name a broken checkpoint or a bad forward input."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmfast.models import AttentionMetadata, load_model
from models_cases import BERT, DECODERS, VOCAB, tiny_checkpoint


def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_checkpoint(tmp_path, **DECODERS["llama"])
    shutil.rmtree(tmp_path)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = load_model(tmp_path)
    ours = dict(model.named_parameters())
    for name, value in hf.state_dict().items():
        torch.testing.assert_close(ours[name], value, atol=0, rtol=0)


@pytest.mark.parametrize("family,embedding", [
    ("qwen2", "model.embed_tokens.weight"), ("gpt2", "transformer.wte.weight"),
])
def test_tied_embeddings_share_one_parameter(tmp_path, family, embedding):
    tiny_checkpoint(tmp_path, **DECODERS[family])
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.get_parameter(embedding)
    # some checkpoints store the tied copy as well: it is accepted (and the embedding is used)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "lm_head.weight": torch.zeros_like(tensors[embedding])}, tmp_path / "model.safetensors")
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.get_parameter(embedding) and (model.lm_head.weight != 0).any()
    # and some store it only under the head's name: transformers loads that into the tied pair
    save_file({**{k: v for k, v in tensors.items() if k != embedding}, "lm_head.weight": tensors[embedding]},
              tmp_path / "model.safetensors")
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.get_parameter(embedding)
    torch.testing.assert_close(model.lm_head.weight, tensors[embedding], atol=0, rtol=0)


def test_untied_lm_head_is_its_own_parameter(tmp_path):
    hf = tiny_checkpoint(tmp_path, **DECODERS["llama"])
    model = load_model(tmp_path)
    torch.testing.assert_close(model.lm_head.weight, hf.lm_head.weight, atol=0, rtol=0)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_stored_dtype_is_converted_to_the_requested_one(tmp_path):
    hf = tiny_checkpoint(tmp_path, **DECODERS["llama"]).to(torch.bfloat16)
    shutil.rmtree(tmp_path)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    for name, value in hf.state_dict().items():
        assert model.get_parameter(name).dtype == torch.float32
        torch.testing.assert_close(model.get_parameter(name), value.float(), atol=0, rtol=0)
    assert load_model(tmp_path, dtype="float16").lm_head.weight.dtype == torch.float16
    assert load_model(tmp_path).lm_head.weight.dtype == torch.bfloat16  # "auto": the config's dtype


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_base")
    tiny_checkpoint(folder, **DECODERS["llama"])
    return folder


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


LOADER_ERRORS = {
    "no folder": (lambda d: shutil.rmtree(d), FileNotFoundError, "no checkpoint folder"),
    "no config": (lambda d: (d / "config.json").unlink(), FileNotFoundError, "config.json"),
    "unsupported model_type": (lambda d: (d / "config.json").write_text('{"model_type": "t5"}'), ValueError, "'t5'"),
    "incomplete config": (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), ValueError,
                          "lacks 'num_attention_heads'"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, "safetensors"),
    "missing shard": (lambda d: (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}'), FileNotFoundError, "model-00002"),
    "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("model.norm.weight")), ValueError,
                       "lacks .*model.norm.weight"),
    "unexpected tensor": (lambda d: _edit_tensors(d, lambda t: t.update({"model.extra.weight": torch.ones(2)})),
                          ValueError, "does not use: model.extra.weight"),
    "shape mismatch": (lambda d: _edit_tensors(d, lambda t: t.update({"model.norm.weight": torch.ones(3)})),
                       ValueError, r"model.norm.weight has shape \(3,\).*\(64,\)"),
    "zero heads": (lambda d: _edit_config(d, num_attention_heads=0), ValueError, "num_attention_heads must be"),
    "head_dim over 256": (lambda d: _edit_config(d, head_dim=320), ValueError, "config.json: head_dim 320 .* over 256"),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
                          ValueError, "model.safetensors: not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(LOADER_ERRORS))
def test_loader_errors_name_the_problem(tmp_path, llama_folder, case):
    break_it, error, message = LOADER_ERRORS[case]
    folder = tmp_path / "ckpt"
    shutil.copytree(llama_folder, folder)
    break_it(folder)
    with pytest.raises(error, match=message):
        load_model(folder)


def test_bad_dtype_and_forward_inputs_are_refused(llama_folder):
    with pytest.raises(ValueError, match="dtype"):
        load_model(llama_folder, dtype="int8")
    model = load_model(llama_folder)
    ids = torch.randint(0, VOCAB, (4,))
    prefill = AttentionMetadata.prefill([4], "cpu")
    decode = AttentionMetadata(slot_mapping=torch.arange(1), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                               context_lens=torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="positions"):
        model(ids, torch.arange(3), prefill)
    with pytest.raises(ValueError, match="kv_caches"):
        model(ids[:1], torch.arange(1), decode)
    with pytest.raises(ValueError, match="kv_caches: expected 2"):
        model(ids[:1], torch.arange(1), decode, kv_caches=[])


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_embedding_indices_out_of_range_are_refused(tmp_path, family):
    """Token ids past the vocabulary, learned positions past their table (GPT-2, BERT) and BERT's token types
    past theirs are a ValueError naming the argument (on CUDA they would be a device-side assert)."""
    bert = family == "bert"
    tiny_checkpoint(tmp_path, auto_class="AutoModel" if bert else "AutoModelForCausalLM",
                    **(BERT if bert else DECODERS[family]))
    model = load_model(tmp_path)
    ids, positions, meta = torch.randint(0, VOCAB, (5,)), torch.arange(5), AttentionMetadata.prefill([5], "cpu")
    for bad_id in (VOCAB, -1):
        with pytest.raises(ValueError, match=rf"input_ids: expected values in \[0, {VOCAB}\)"):
            model(torch.cat([ids[:4], torch.tensor([bad_id])]), positions, meta)
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float(), positions, meta)
    table = model.config.max_position_embeddings
    if family == "llama":  # rotary positions have no table: past max_position_embeddings they still run
        model(ids, positions + table, meta)
    else:
        with pytest.raises(ValueError, match=rf"positions: expected values in \[0, {table}\)"):
            model(ids, positions + table - 4, meta)
    if bert:
        with pytest.raises(ValueError, match=r"token_type_ids: expected values in \[0, 2\)"):
            model(ids, positions, meta, token_type_ids=torch.full((5,), 2))
        with pytest.raises(ValueError, match="token_type_ids: expected None or a tensor of shape"):
            model(ids, positions, meta, token_type_ids=torch.zeros(4, dtype=torch.long))
