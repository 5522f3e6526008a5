"""Tiny random Hugging Face checkpoints shared by the model tests (test_models*.py)."""
import pytest
import torch

from helpers import tiny_decoder_configs

transformers = pytest.importorskip("transformers")

VOCAB = 1000
DECODERS = tiny_decoder_configs(VOCAB)
BERT = dict(model_type="bert", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)


def tiny_checkpoint(folder, auto_class="AutoModelForCausalLM", **config):
    """A random HF model saved (safetensors) in ``folder``; every parameter is perturbed so that biases and
    norm weights are not their trivial init."""
    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(0)
    hf = getattr(transformers, auto_class).from_config(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(folder)
    return hf
