"""Incremental detokenisation and stop strings.

A token's text can depend on its neighbours (SentencePiece's leading spaces, byte-level pieces of one
character), so each step decodes a short window of the latest tokens twice, with and without the new
one, and appends the difference (vLLM's prefix/read offsets); the end of a window that stops inside a
multi-byte character waits for the next token.
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

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except ValueError as exc:  # a broken tokenizer.json or tokenizer_config.json: say which folder
        raise ValueError(f"model: the tokenizer files in {folder} could not be read ({exc})") from exc


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self._decode([token_id])

    def update(self, seq: Sequence, num_tokens: int, final: bool = False) -> str:
        """Decodes ``seq.token_ids`` up to ``num_tokens`` (the newest token is left out when it is the
        eos or stop token that ended the sequence); appends the new text to ``seq.text`` and returns it.

        Trailing U+FFFD may be a multi-byte character still arriving: they wait for the next token, or for
        the last one (``final``: the sequence ended, so they are the text). The text before them does not
        wait, so a run of tokens that each end inside a character cannot hold text back."""
        if self.tokenizer is None or num_tokens <= seq.read_offset:
            return ""
        ids = seq.token_ids
        before = self._decode(ids[seq.prefix_offset:seq.read_offset])
        after = self._decode(ids[seq.prefix_offset:num_tokens])
        complete = final or not after.endswith("\ufffd")
        shown = after if complete else after.rstrip("\ufffd")
        start = len(before) + seq.held_chars  # what this window has already given to seq.text
        if len(shown) <= start:  # nothing printable yet
            return ""
        piece = shown[start:]
        if complete:
            seq.prefix_offset, seq.read_offset, seq.held_chars = seq.read_offset, num_tokens, 0
        else:
            seq.held_chars += len(piece)
        seq.text += piece
        return piece

    @staticmethod
    def find_stop_string(seq: Sequence, new_chars: int) -> str | None:
        """The stop string that the last ``new_chars`` characters completed earliest in the text (the first
        listed at a tie); the text is cut where it begins, so it holds none of them."""
        found = None  # (position, stop)
        for stop in seq.params.stop:
            start = max(len(seq.text) - new_chars - len(stop) + 1, 0)
            at = seq.text.find(stop, start)
            if at != -1 and (found is None or at < found[0]):
                found = (at, stop)
        if found is None:
            return None
        seq.text = seq.text[:found[0]]
        return found[1]
