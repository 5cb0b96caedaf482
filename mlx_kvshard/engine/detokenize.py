"""Token ids -> text, one delta per token, as OpenAI and vLLM return a completion: the
decoded completion tokens with their leading space kept, so prompt + text reads right
("The capital of France is" -> " Paris."). mlx-lm's streaming detokenizers drop the first
space (its SentencePiece one on purpose; its BPE one whenever the text so far is empty).

The incremental scheme vLLM uses: decode a short window that starts a few tokens back (in
the prompt, at first), and emit what the newest tokens add to that window's text. The
tokens before give a tokenizer that strips a sequence's first space (SentencePiece) the
context to keep it. A character split across tokens (byte-level BPE spells a multi-byte
UTF-8 character with several byte tokens) decodes to U+FFFD until its last byte arrives:
held back until then, so no delta ever holds half a character."""

from __future__ import annotations

CONTEXT_TOKENS = 6  # prompt tokens decoded before the first completion token (vLLM uses 5)
REPLACEMENT = "\ufffd"


class TextDecoder:
    def __init__(self, tokenizer, context: list[int] = (), trim_first_space: bool = False):
        """`context`: the tokens before the completion (the prompt); `trim_first_space`:
        drop one leading space from the text, as chat content does."""
        self.tokenizer = tokenizer
        self.ids = list(context[-CONTEXT_TOKENS:])
        self.start = 0  # the window decoded each time starts here
        self.read = len(self.ids)  # ids before this are in the text already
        self.window_text: str | None = None  # decode(ids[start:read]); first computed on the first token
        self.trim = trim_first_space
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if ids else ""

    def add(self, token: int) -> str:
        """The text `token` completes ("" while a character is still incomplete)."""
        if self.window_text is None:  # lazily: the caller holds the tokenizer now
            self.window_text = self._decode(self.ids[self.start:self.read])
            if self.window_text.endswith(REPLACEMENT):  # the context ends mid-character: decode without it
                self.ids, self.start, self.read, self.window_text = [], 0, 0, ""
        self.ids.append(token)
        new = self._decode(self.ids[self.start:])
        if new.endswith(REPLACEMENT) or len(new) <= len(self.window_text):
            return ""
        return self._advance(new)

    def flush(self) -> str:
        """What the held-back tokens decode to at the end (an incomplete character as U+FFFD)."""
        if self.read == len(self.ids) or self.window_text is None:
            return ""
        return self._advance(self._decode(self.ids[self.start:]))

    def _advance(self, new: str) -> str:
        delta = new[len(self.window_text):]
        self.start, self.read = self.read, len(self.ids)
        self.window_text = self._decode(self.ids[self.start:self.read])
        if self.trim and not self.text and delta.startswith(" "):
            delta = delta[1:]
        self.text += delta
        return delta
