"""Text in and out of the engine: a Hugging Face tokenizer, and streamed detokenization with stop strings.

The server turns each request's growing token ids into text deltas (TextStream). Two things make
that more than `decode(new_ids)`: a byte-level token may end inside a multi-byte UTF-8 character
(the decoded text then ends in U+FFFD until the next token completes it), and text that might be
the start of a stop string must be held back, because the client never sees the stop string or
anything after it (OpenAI semantics). The engine ends a request on a stop string with the same
`decode`, so the text cut here and the tokens it generated agree.

Both are O(1) amortised per token, whatever the output's length: Detokenizer decodes a sliding
window of the last few tokens (vLLM's incremental detokenization: the window starts one step back,
so decoders that treat a leading space specially see the same context twice), and TextStream
searches for stop strings only in the new text plus what it holds back (at most the longest stop
string less one character; text already sent never ends with a stop string's beginning).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import tokenizers

# Characters past which Codec.encode (tokens: a quarter, decode) goes through the batch entry points:
# `tokenizers` holds the GIL through Tokenizer.encode/decode but releases it in encode_batch/
# decode_batch, so a long prompt tokenized on a worker thread would otherwise stall the event loop
# for as long as it takes (~300 ms for 100 KB measured; benchmarks/serve_api.py).
LONG_TEXT = 4096
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
    if len(text) > LONG_TEXT:  # encode_batch releases the GIL (encode does not): see LONG_TEXT
      return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int]) -> str:
    if len(ids) > LONG_TEXT // 4:
      return self.tokenizer.decode_batch([list(ids)], skip_special_tokens=True)[0]
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  def token_text(self, token_id: int) -> str:
    """One token as logprobs name it (cached per id): its text; a token that is part of a UTF-8
    character, OpenAI's 'bytes:\\xNN...'; an id the tokenizer lacks, vLLM's 'token_id:N'."""
    return self._token(token_id)[0]

  def token_bytes(self, token_id: int) -> list[int]:
    """One token's UTF-8 bytes (exact for byte-level and byte-fallback vocabularies)."""
    return list(self._token(token_id)[1])

  def _token(self, token_id: int) -> tuple[str, bytes]:
    cache = _TOKENS.setdefault(id(self.tokenizer), {})
    got = cache.get(token_id)
    if got is None:
      got = cache[token_id] = _describe(self.tokenizer, token_id)
    return got


_TOKENS: dict[int, dict[int, tuple[str, bytes]]] = {}


def _byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level alphabet: the character that stands for each byte in a vocabulary."""
  printable = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  chars, n = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + n)] = b
      n += 1
  return chars


_BYTE_LEVEL = _byte_level_alphabet()


def _describe(tokenizer: tokenizers.Tokenizer, token_id: int) -> tuple[str, bytes]:
  raw = tokenizer.id_to_token(token_id)
  if raw is None:
    return f'token_id:{token_id}', b''
  text = tokenizer.decode([token_id], skip_special_tokens=False)
  if len(raw) == 6 and raw.startswith('<0x') and raw.endswith('>'):  # SentencePiece byte fallback
    data = bytes([int(raw[3:5], 16)])
  elif '\ufffd' in text and all(c in _BYTE_LEVEL for c in raw):
    data = bytes(_BYTE_LEVEL[c] for c in raw)
  else:
    data = text.encode('utf-8')
  if '\ufffd' in text:
    text = 'bytes:' + ''.join(f'\\x{b:02x}' for b in data)
  return text, data


class Detokenizer:
  """Incremental decoding of a growing list of token ids, O(1) amortised per token.

  `push(ids)` returns the text those ids complete; text that ends in an incomplete character
  (U+FFFD) is held until a later token completes it, or `final` flushes it.
  """

  def __init__(self, decode: Callable[[Sequence[int]], str]):
    self._decode = decode
    self.ids: list[int] = []
    self._prefix = 0  # window start: decoded again as context for the tokens after it
    self._read = 0  # tokens before this are emitted

  def push(self, new_ids: Sequence[int], final: bool = False) -> str:
    self.ids.extend(new_ids)
    if self._read == len(self.ids):
      return ''
    before = self._decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ''
    text = self._decode(self.ids[self._prefix:])
    if len(text) > len(before) and (final or not text.endswith('\ufffd')):
      self._prefix, self._read = self._read, len(self.ids)
      return text[len(before):]
    return ''


class TextStream:
  """One choice's text so far; `push` returns the new text that is safe to send."""

  def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
    self._detokenizer, self._stop = Detokenizer(decode), tuple(stop)
    self._parts: list[str] = []  # text sent so far, in pieces (joined on demand)
    self._held = ''  # decoded text not sent yet: a tail that may begin a stop string
    self.stopped = False  # a stop string was found: nothing more is sent

  @property
  def ids(self) -> list[int]:
    return self._detokenizer.ids

  @property
  def sent(self) -> str:
    """Text sent so far."""
    if len(self._parts) > 1:
      self._parts[:] = [''.join(self._parts)]
    return self._parts[0] if self._parts else ''

  def push(self, new_ids: Sequence[int], final: bool = False) -> str:
    """Adds `new_ids`; returns text not sent before, holding back an incomplete character and any
    tail that may begin a stop string, unless `final`. Text from the first stop string on is cut."""
    if self.stopped:
      self._detokenizer.ids.extend(new_ids)
      return ''
    text = self._held + self._detokenizer.push(new_ids, final)
    # Sent text never ends with a stop string's beginning, so any stop string lies in `text`.
    cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
    if cut >= 0:
      text, final, self.stopped = text[:cut], True, True
    held = 0 if final else self._stop_prefix_len(text)
    self._held = text[len(text) - held:] if held else ''
    delta = text[:len(text) - held]
    if delta:
      self._parts.append(delta)
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
