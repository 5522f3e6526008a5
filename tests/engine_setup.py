"""Tiny random checkpoints (float32, CPU) with a byte-level BPE tokenizer trained offline, and Hugging
Face's greedy tokens, shared by the engine's end-to-end tests."""

import pytest
import torch

from llmfast.engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TEXT = ["The quick brown fox jumps over the lazy dog.", "Paged attention keeps keys and values in blocks.",
        "A scheduler batches requests continuously; prefill and decode share one batch!",
        "Héllo wörld: ünïcode, 日本語 text and numbers 0123456789."]
MAX_LEN = 96
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=MAX_LEN)
FAMILIES = {
    "llama": dict(model_type="llama", **LLAMA_LIKE),
    "mistral": dict(model_type="mistral", **LLAMA_LIKE, sliding_window=MAX_LEN),
    "qwen2": dict(model_type="qwen2", **LLAMA_LIKE, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", **LLAMA_LIKE, head_dim=32),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=MAX_LEN),
}
PROMPT_LENGTHS = [1, 2, 7, 16, 17, 33, 64]
MAX_TOKENS = 12


def build_tokenizer():
    """A byte-level BPE trained on a few sentences (offline), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """family -> (folder, HF model), built on first use; every folder but gpt2's holds the tokenizer."""
    built = {}

    def get(family):
        if family not in built:
            folder = tmp_path_factory.mktemp(family)
            config = transformers.AutoConfig.for_model(**FAMILIES[family], vocab_size=len(tokenizer),
                                                       eos_token_id=tokenizer.eos_token_id)
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(config).eval()
            with torch.no_grad():
                for p in hf.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            hf.save_pretrained(folder)
            if family != "gpt2":
                tokenizer.save_pretrained(folder)
            built[family] = folder, hf
        return built[family]

    return get


def hf_greedy(hf, prompt, max_tokens=MAX_TOKENS):
    """HF's greedy tokens, never stopping at eos (as ignore_eos=True), with the raw log-softmax per step."""
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                      eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)  # (max_tokens, vocab)
    return out.sequences[0, len(prompt):].tolist(), logprobs


def random_prompts(lengths, vocab, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(checkpoints):
    folder, hf = checkpoints("llama")
    return LLM(folder, device="cpu", block_size=4, num_kv_blocks=256), hf
