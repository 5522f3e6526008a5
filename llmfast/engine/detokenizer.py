"""Incremental detokenisation and stop strings.

A token's text can depend on its neighbours (SentencePiece's leading spaces, byte-level pieces of one
character), so each step decodes a short window of the latest tokens twice, with and without the new
one, and appends the difference (vLLM's prefix/read offsets); a window that ends inside a multi-byte
character waits for the next token.
"""
from __future__ import annotations

from pathlib import Path

from llmfast.engine.sequence import Sequence


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (transformers ``AutoTokenizer``, local files only), or None when the
    folder has none (then only token-id prompts are accepted)."""
    folder = Path(path)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                          "tokenizer.model")):
        return None
    from transformers import AutoTokenizer  # transformers is needed only with a tokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self._decode([token_id])

    def update(self, seq: Sequence, num_tokens: int) -> str:
        """Decodes ``seq.token_ids`` up to ``num_tokens`` (the newest token is left out when it is the
        eos or stop token that ended the sequence); appends the new text to ``seq.text`` and returns it."""
        if self.tokenizer is None or num_tokens <= seq.read_offset:
            return ""
        ids = seq.token_ids
        before = self._decode(ids[seq.prefix_offset:seq.read_offset])
        after = self._decode(ids[seq.prefix_offset:num_tokens])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # nothing printable yet
            return ""
        piece = after[len(before):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, num_tokens
        seq.text += piece
        return piece

    @staticmethod
    def find_stop_string(seq: Sequence, new_chars: int) -> str | None:
        """The first of ``seq``'s stop strings that the last ``new_chars`` characters completed; the text
        is cut where it begins."""
        for stop in seq.params.stop:
            start = max(len(seq.text) - new_chars - len(stop) + 1, 0)
            at = seq.text.find(stop, start)
            if at != -1:
                seq.text = seq.text[:at]
                return stop
        return None
