"""llmfast.eval.perplexity against Hugging Face transformers: a tiny random checkpoint with a tiny word-level
tokenizer, both built offline; exp(HF's mean loss) over the same sliding windows, to 1e-4 relative."""
import contextlib
import math
import shutil
import subprocess
import sys

import pytest
import torch

from llmfast import cli
from llmfast import eval as llmfast_eval
from llmfast.eval import perplexity, sliding_windows

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "the cat sits on the mat and looks at the dog",
    "a quick brown fox jumps over the lazy dog near the river",
    "kernels fuse the residual add into the norm of the layer",
    "the model reads the text one window at a time",
]
TEXT = " ".join(SENTENCES * 2)  # 88 words
VOCAB = 64
FAMILIES = {
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                 bos_token_id=1, eos_token_id=1),
}


def save_tokenizer(folder):
    """A word-level tokenizer trained on SENTENCES that adds a [BOS] before each text, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[BOS]"]))
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    assert tok.get_vocab_size() <= VOCAB
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]").save_pretrained(
        folder)


def save_checkpoint(folder, **config):
    """A random HF model of ``config`` and the tokenizer, saved in ``folder``; returns the HF model."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # far from uniform predictions, so that a wrong token shows
    hf.save_pretrained(folder)
    save_tokenizer(folder)
    return hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, save_checkpoint(folder, **FAMILIES[request.param])


def hf_perplexity(hf, token_ids, stride, max_length):
    """exp of HF's mean loss over the windows of transformers' perplexity recipe, written out as its docs do
    (not taken from llmfast): a window of max_length starts every stride tokens and labels only the tokens
    after the previous window's end. Each window's loss weighs the tokens it scored (the docs' snippet
    weighs one fewer, which is not the mean loss); a window that scores nothing (its loss is NaN) adds
    nothing."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(token_ids), stride):
        end = min(begin + max_length, len(token_ids))
        new_tokens = end - prev_end
        input_ids = torch.tensor(token_ids[begin:end])[None]
        labels = input_ids.clone()
        labels[:, :-new_tokens] = -100
        scored = int((labels[:, 1:] != -100).sum())  # the model shifts the labels by one
        if scored:
            with torch.no_grad():
                nll += hf(input_ids=input_ids, labels=labels).loss.item() * scored
        count += scored
        prev_end = end
        if end == len(token_ids):
            break
    return math.exp(nll / count)


def tokens_of(folder, text=TEXT):
    return transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


@pytest.mark.parametrize("stride,max_length", [(8, 16), (16, 16), (5, 32), (1, 3)])
def test_perplexity_matches_hf(checkpoint, stride, max_length):
    folder, hf = checkpoint
    token_ids = tokens_of(folder)
    assert token_ids[0] == 1 and len(token_ids) == 1 + len(TEXT.split())
    expected = hf_perplexity(hf, token_ids, stride, max_length)
    assert perplexity(folder, TEXT, stride, max_length, device="cpu") == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("num_tokens,stride,max_length", [(89, 8, 16), (10, 3, 4), (5, 1, 2), (2, 7, 7), (89, 16, 16)])
def test_windows_score_each_token_once(num_tokens, stride, max_length):
    windows = sliding_windows(num_tokens, stride, max_length)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert all(end - begin <= max_length for begin, end, _ in windows) and windows[-1][1] == num_tokens
    if stride < max_length:  # overlapping windows: every token but the text's first
        assert scored == list(range(1, num_tokens))
    else:  # disjoint windows: a window's first token has no context in it, so it is not scored (as HF's recipe)
        assert scored == [t for t in range(num_tokens) if t % stride != 0]


def test_packing_windows_into_several_forwards_changes_nothing(checkpoint, monkeypatch):
    folder, _ = checkpoint
    one_forward = perplexity(folder, TEXT, 4, 16, device="cpu")
    monkeypatch.setattr(llmfast_eval, "TOKENS_PER_FORWARD", 20)
    monkeypatch.setattr(llmfast_eval, "LOGIT_ROWS", 3)
    assert perplexity(folder, TEXT, 4, 16, device="cpu") == pytest.approx(one_forward, rel=1e-6)


@pytest.mark.parametrize("stride,max_length,message", [
    (0, 16, "stride"), (17, 16, "stride"), (8, 33, "max_length"), (8, 0, "max_length"), (1, 1, "max_length"),
])
def test_bad_windows_are_refused(checkpoint, stride, max_length, message):
    with pytest.raises(ValueError, match=message):
        perplexity(checkpoint[0], TEXT, stride, max_length)


@pytest.mark.parametrize("checkpoint", ["llama"], indirect=True)
def test_a_checkpoint_without_a_tokenizer_is_refused(checkpoint, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoint[0], folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="model_dir: .* has no tokenizer files"):
        perplexity(folder, TEXT, 8, 16)


@pytest.mark.parametrize("checkpoint", ["llama"], indirect=True)  # one run: the command takes seconds to start
def test_cli_prints_the_perplexity(checkpoint, tmp_path):
    folder, _ = checkpoint
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    command = [sys.executable, "-m", "llmfast", "eval", "ppl", "--model", str(folder), "--file", str(text_file),
               "--stride", "8", "--max-length", "16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(perplexity(folder, TEXT, 8, 16), rel=1e-5)


@pytest.mark.parametrize("checkpoint", ["llama"], indirect=True)
def test_cli_reports_bad_arguments(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    assert cli.main(["eval", "ppl", "--model", str(folder), "--file", str(text_file), "--max-length", "99"]) == 2
    assert "max_length" in capsys.readouterr().err
    assert cli.main(["eval", "ppl", "--model", str(folder), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert cli.main(["eval", "ppl", "--model", str(folder), "--file", str(text_file), "--max-length", "1"]) == 2
    assert "max_length: expected at least 2" in capsys.readouterr().err
    for device in ("tpu", "cuda:99"):  # a device no machine here has ends cleanly too
        assert cli.main(["eval", "ppl", "--model", str(folder), "--file", str(text_file), "--device", device]) == 2
        assert "device" in capsys.readouterr().err


def test_defaults_are_the_whole_model_length_and_half_of_it(checkpoint):
    folder, hf = checkpoint  # max_position_embeddings / n_positions 32
    assert perplexity(folder, TEXT, device="cpu") == pytest.approx(hf_perplexity(hf, tokens_of(folder), 16, 32),
                                                     rel=1e-4)


@pytest.mark.parametrize("checkpoint", ["llama"], indirect=True)
def test_a_last_window_of_one_token_scores_nothing(checkpoint):
    folder, hf = checkpoint
    text = " ".join(TEXT.split()[:32])  # [BOS] + 32 words: windows of 32, then one of the last token alone
    token_ids = tokens_of(folder, text)
    assert len(token_ids) == 33
    assert perplexity(folder, text, 32, 32, device="cpu") == pytest.approx(hf_perplexity(hf, token_ids, 32, 32),
                                                              rel=1e-4)


def test_a_sliding_window_bounds_the_default_window(tmp_path):
    hf = save_checkpoint(tmp_path, **dict(FAMILIES["llama"], model_type="mistral", max_position_embeddings=64,
                                          sliding_window=20))
    expected = hf_perplexity(hf, tokens_of(tmp_path), 10, 20)
    assert perplexity(tmp_path, TEXT, device="cpu") == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="max_length: the model reads at most 20"):
        perplexity(tmp_path, TEXT, 10, 21)


@pytest.mark.parametrize("checkpoint", ["llama"], indirect=True)
def test_a_huge_mean_loss_is_inf_and_a_non_finite_one_an_error(checkpoint, monkeypatch):
    folder, _ = checkpoint
    monkeypatch.setattr(llmfast_eval, "_negative_log_likelihood", lambda model, ids, windows: (800.0 * 88, 88))
    assert perplexity(folder, TEXT, 8, 16) == math.inf
    monkeypatch.setattr(llmfast_eval, "_negative_log_likelihood", lambda model, ids, windows: (math.nan, 88))
    with pytest.raises(ValueError, match="not finite.*try dtype float32"):
        perplexity(folder, TEXT, 8, 16)


@pytest.mark.parametrize("checkpoint", ["llama"], indirect=True)
def test_cli_checks_windows_before_loading_and_reads_past_a_bom(checkpoint, tmp_path, capsys, monkeypatch):
    folder, _ = checkpoint
    text_file = tmp_path / "text.txt"
    text_file.write_text("\ufeff" + TEXT, encoding="utf-8")
    assert cli.main(["eval", "ppl", "--model", str(folder), "--file", str(text_file), "--stride", "8",
                     "--max-length", "16"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(perplexity(folder, TEXT, 8, 16), rel=1e-6)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the windows were checked")

    monkeypatch.setattr(llmfast_eval, "load_model", no_loading)
    for args, message in ((["--stride", "0"], "--stride: expected a positive int"),
                          (["--stride", "9", "--max-length", "8"], "stride: expected at most max_length (8)")):
        with pytest.raises(SystemExit) if args[1] == "0" else contextlib.nullcontext():
            code = cli.main(["eval", "ppl", "--model", str(folder), "--file", str(text_file), *args])
            assert code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("checkpoint", ["llama"], indirect=True)
def test_cli_turns_out_of_memory_into_advice(checkpoint, tmp_path, capsys, monkeypatch):
    folder, _ = checkpoint
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 GiB")

    monkeypatch.setattr(llmfast_eval, "_negative_log_likelihood", out_of_memory)
    assert cli.main(["eval", "ppl", "--model", str(folder), "--file", str(text_file)]) == 2
    assert "out of memory with windows of the model's maximum length; pass a smaller --max-length" \
        in capsys.readouterr().err
