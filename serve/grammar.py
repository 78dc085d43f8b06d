"""Grammar-constrained decoding: JSON and JSON-schema grammars as token bitmasks, by llguidance.

A Grammar is compiled once per request (shared by its n choices); the engine makes one matcher per
sequence (`matcher()`), fills that sequence's row of the step's bitmask from it before each step
(`fill_bitmask`: bit v % 32 of word v // 32 set where token v is allowed) and feeds it each sampled
token. The bitmask is applied to the logits on device (serve/sampling.apply_mask).

Why llguidance and not xgrammar: xgrammar 0.2.9 resolves with our pins but requires torch,
transformers and triton (a 286 MB wheel) at run time, which a JAX server does not otherwise need
(torch is a test-only dependency here); llguidance (Microsoft's guidance-ai, one of vLLM's two
structured-output backends) is a 3 MB Rust wheel with no dependencies, reads a Hugging Face
tokenizer.json directly, and computes masks in Rust with the GIL released.

JSON is compiled compact (no optional whitespace), so a grammar leaves the model no room to pad.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np

from serve.text import Codec

_TOKENIZERS: dict[tuple[int, int], llguidance.LLTokenizer] = {}
_LOCK = threading.Lock()


class GrammarError(ValueError):
  """A schema or grammar that cannot be compiled; the message says why."""


def _tokenizer(codec: Codec, vocab_size: int) -> llguidance.LLTokenizer:
  """The llguidance view of `codec` over the model's vocabulary (ids past the tokenizer's are
  never allowed); built once per tokenizer (about a second for a large vocabulary)."""
  key = (id(codec.tokenizer), vocab_size)
  with _LOCK:
    tok = _TOKENIZERS.get(key)
    if tok is None:
      eos = list(codec.stop_token_ids) or None
      tok = _TOKENIZERS[key] = llguidance.LLTokenizer(codec.tokenizer.to_str(), n_vocab=vocab_size,
                                                      eos_token=eos)
  return tok


@dataclasses.dataclass(frozen=True, eq=False)
class Grammar:
  """A compiled grammar for one model's vocabulary; `matcher()` starts a sequence on it."""

  source: str  # llguidance's grammar (from LLMatcher.grammar_from_*)
  tokenizer: llguidance.LLTokenizer
  vocab_size: int
  # Built once where the grammar is compiled (off the engine's thread: building can take long for
  # a large grammar); each sequence starts on a copy.
  start: llguidance.LLMatcher = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self.start is None:
      m = llguidance.LLMatcher(self.tokenizer, self.source, log_level=0)
      if m.is_error():
        raise GrammarError(f'the grammar does not compile: {m.get_error()}')
      object.__setattr__(self, 'start', m)

  def matcher(self) -> llguidance.LLMatcher:
    return self.start.deep_copy()

  @staticmethod
  def fill_bitmask(matcher: llguidance.LLMatcher, mask_BW: np.ndarray, row: int) -> None:
    """Row `row` of an int32 [B, ceil(V / 32)] mask: the tokens `matcher` allows next."""
    llguidance.numpy.fill_next_token_bitmask(matcher, mask_BW, row)


def json_schema(codec: Codec, vocab_size: int, schema: dict[str, Any] | None) -> Grammar:
  """A grammar for JSON that validates against `schema` (None: any JSON object, as OpenAI's
  `json_object`). GrammarError names what the compiler rejected."""
  if schema is None:
    schema = {'type': 'object'}
  try:
    source = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema), defaults={'whitespace_flexible': False})
  except (ValueError, TypeError) as e:
    raise GrammarError(f'the JSON schema cannot be compiled: {e}') from e
  tokenizer = _tokenizer(codec, vocab_size)
  is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, tokenizer)
  if is_error:
    raise GrammarError(f'the JSON schema cannot be compiled: {messages[0] if messages else ""}')
  return Grammar(source, tokenizer, vocab_size)
