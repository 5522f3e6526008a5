"""Evaluation on llmfast's models: the perplexity of a text under a checkpoint, with a sliding window."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llmfast.engine.detokenizer import load_tokenizer
from llmfast.models import AttentionMetadata, load_model
from llmfast.ops._checks import check_positive_int

TOKENS_PER_FORWARD = 8192  # windows packed into one varlen forward, up to this many tokens
LOGIT_ROWS = 1024  # scored tokens turned into logits at once: bounds the (rows, vocab) float32 buffer


def sliding_windows(num_tokens: int, stride: int, max_length: int) -> list[tuple[int, int, int]]:
    """Hugging Face's perplexity recipe: windows ``tokens[begin:end]`` of at most ``max_length`` tokens whose
    starts advance by ``stride``; each scores only its new tokens ``tokens[first:end]`` (never its own first
    token, which has no context in it). Returns ``(begin, end, first)`` triples."""
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def perplexity(
    model_dir: str | Path,
    text: str,
    stride: int | None = None,
    max_length: int | None = None,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
) -> float:
    """``exp`` of the mean negative log-likelihood of ``text``'s tokens under the causal LM in ``model_dir``.

    ``text`` is tokenized with the checkpoint's tokenizer as the recipe does (``tokenizer(text)``, special
    tokens included) and scored in ``sliding_windows(len(tokens), stride, max_length)``: each token at most
    once, never the text's first (with ``stride == max_length`` no window's first either, as in the recipe).
    ``max_length`` defaults to the most positions the model reads (``max_position_embeddings``, or a smaller
    ``sliding_window``), ``stride`` to half of it. The model is ``load_model(model_dir, dtype=dtype,
    device=device)``.

    The mean is over the tokens actually scored: each window's loss weighs as many tokens as it scored
    (the snippet in transformers' docs weighs one fewer per window, which is not the mean loss), and a
    last window with a single token, which scores nothing, adds nothing (the snippet's loss is NaN there).
    A mean NLL too large for ``exp`` gives ``inf``; a non-finite NLL (overflowing half-precision logits)
    is a ValueError.
    """
    for name, value in (("stride", stride), ("max_length", max_length)):
        check_positive_int(name, value, allow_none=True)
    if stride is not None and max_length is not None and stride > max_length:
        raise ValueError(f"stride: expected at most max_length ({max_length}), so that no token is skipped, "
                         f"got {stride}")
    model = load_model(model_dir, dtype=dtype, device=device)
    if not hasattr(model, "compute_logits"):
        raise ValueError(f"model_dir: {type(model).__name__} is not a causal language model; perplexity needs one")
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"model_dir: {model_dir} has no tokenizer files; the text is tokenized with the checkpoint's")
    token_ids = tokenizer(text, verbose=False)["input_ids"]  # no warning that the text outgrows the model
    longest = model.config.max_position_embeddings
    if getattr(model.config, "sliding_window", None) is not None:  # llmfast's attention has no sliding-window mask
        longest = min(longest, model.config.sliding_window)
    max_length = longest if max_length is None else max_length
    stride = max(1, max_length // 2) if stride is None else stride
    check_positive_int("max_length", max_length)
    check_positive_int("stride", stride)
    if max_length < 2:
        raise ValueError(f"max_length: expected at least 2 (a window scores only the tokens after its first), "
                         f"got {max_length}")
    if max_length > longest:
        raise ValueError(f"max_length: the model reads at most {longest} positions (max_position_embeddings, or "
                         f"sliding_window if smaller), got {max_length}")
    if stride > max_length:
        raise ValueError(f"stride: expected at most max_length ({max_length}), so that no token is skipped, "
                         f"got {stride}")
    if len(token_ids) < 2:
        raise ValueError(f"text: expected at least 2 tokens (the first one is never scored), got {len(token_ids)}")
    nll, count = _negative_log_likelihood(model, token_ids, sliding_windows(len(token_ids), stride, max_length))
    if not math.isfinite(nll):
        raise ValueError(f"model_dir: the log-likelihood is not finite ({nll}); in float16 or bfloat16 the logits "
                         "may overflow: try dtype float32")
    try:
        return math.exp(nll / count)
    except OverflowError:  # a mean NLL above ~709 nats
        return math.inf


def _batches(windows: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows grouped into at most ``TOKENS_PER_FORWARD`` tokens (a longer window alone)."""
    batches, tokens = [[]], 0
    for begin, end, first in windows:
        if batches[-1] and tokens + end - begin > TOKENS_PER_FORWARD:
            batches, tokens = [*batches, []], 0
        batches[-1].append((begin, end, first))
        tokens += end - begin
    return batches


@torch.inference_mode()
def _negative_log_likelihood(model, token_ids: list[int], windows) -> tuple[float, int]:
    """Summed NLL of every window's scored tokens, and their number; windows run packed as varlen batches."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in _batches(windows):
        input_ids = torch.tensor([t for begin, end, _ in batch for t in token_ids[begin:end]], device=device)
        positions = torch.cat([torch.arange(end - begin, device=device) for begin, end, _ in batch])  # (tokens,)
        meta = AttentionMetadata.prefill([end - begin for begin, end, _ in batch], device)
        hidden = model(input_ids, positions, meta)  # (tokens, hidden)
        # text token t is predicted by the hidden state of the token before it in its window
        rows, targets, offset = [], [], 0
        for begin, end, first in batch:
            rows.extend(range(offset + first - 1 - begin, offset + end - 1 - begin))
            targets.extend(token_ids[first:end])
            offset += end - begin
        rows_t, targets_t = torch.tensor(rows, device=device), torch.tensor(targets, device=device)
        for start in range(0, len(rows), LOGIT_ROWS):
            logits = model.compute_logits(hidden[rows_t[start:start + LOGIT_ROWS]]).float()  # (rows, vocab)
            nll += F.cross_entropy(logits, targets_t[start:start + LOGIT_ROWS], reduction="sum").item()
        count += len(rows)
    return nll, count
