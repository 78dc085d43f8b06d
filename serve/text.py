"""Text in and out of the engine: a Hugging Face tokenizer, and streamed detokenization with stop strings.

The server turns each request's growing token ids into text deltas (TextStream). Two things make
that more than `decode(new_ids)`: a byte-level token may end inside a multi-byte UTF-8 character
(the decoded text then ends in U+FFFD until the next token completes it), and text that might be
the start of a stop string must be held back, because the client never sees the stop string or
anything after it (OpenAI semantics). The engine ends a request on a stop string with the same
`decode`, so the text cut here and the tokens it generated agree.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import tokenizers

# End-of-text tokens looked for, in order, when the tokenizer config names none.
EOS_CANDIDATES = ('<|endoftext|>', '<|end_of_text|>', '<|eot_id|>', '<|im_end|>', '</s>', '<eos>')


@dataclasses.dataclass(frozen=True)
class Codec:
  """A tokenizer with the ids that end generation (`stop_token_ids`) and its special tokens' text."""

  tokenizer: tokenizers.Tokenizer
  stop_token_ids: tuple[int, ...] = ()
  bos_token: str | None = None
  eos_token: str | None = None

  @classmethod
  def from_file(cls, path: str, eos_token: str | None = None) -> Codec:
    """Loads a tokenizer.json (or the one in a directory); the end-of-text token from `eos_token`,
    else the first of EOS_CANDIDATES it holds (none: generation ends only on max_tokens/stop)."""
    file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f'tokenizer {file!r}: no such file; give a Hugging Face tokenizer.json '
                              '(or its directory) with --tokenizer.')
    try:
      tokenizer = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
      raise ValueError(f'tokenizer {file!r} is not a valid tokenizer.json: {e}') from e
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    eos = next((t for t in candidates if t and tokenizer.token_to_id(t) is not None), None)
    if eos_token and eos is None:
      raise ValueError(f'end-of-text token {eos_token!r} is not in the vocabulary of {file}.')
    stop = () if eos is None else (tokenizer.token_to_id(eos),)
    return cls(tokenizer, stop, None, eos)

  @property
  def vocab_size(self) -> int:
    """One past the largest id: the smallest model vocabulary that covers the tokenizer."""
    return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
  """One choice's text so far; `push` returns the new text that is safe to send."""

  def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
    self._decode, self._stop = decode, tuple(stop)
    self.ids: list[int] = []
    self.sent = ''  # text sent so far
    self.stopped = False  # a stop string was found: nothing more is sent

  def push(self, new_ids: Sequence[int], final: bool = False) -> str:
    """Adds `new_ids`; returns text not sent before, holding back an incomplete character and any
    tail that may begin a stop string, unless `final`. Text from the first stop string on is cut."""
    self.ids.extend(new_ids)
    if self.stopped:
      return ''
    text = self._decode(self.ids)
    cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
    if cut >= 0:
      text, final, self.stopped = text[:cut], True, True
    if not final:
      text = text.rstrip('\ufffd')
      text = text[:len(text) - self._stop_prefix_len(text)]
    if len(text) <= len(self.sent) or not text.startswith(self.sent):
      return ''  # nothing new (or a decoder that rewrote text already sent: it cannot be unsent)
    delta, self.sent = text[len(self.sent):], text
    return delta

  def _stop_prefix_len(self, text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in self._stop:
      for n in range(min(len(s) - 1, len(text)), best, -1):
        if text.endswith(s[:n]):
          best = n
          break
    return best
