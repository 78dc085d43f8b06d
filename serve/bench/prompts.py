"""Prompt texts of exact token counts, built with the server's tokenizer.

The words are vocabulary entries that are a space and then one run of letters, of digits or of
punctuation (' the', 'Ġthe' in a byte-level BPE, '▁the' in a SentencePiece vocabulary, ' 42', ' =') and
encode back to themselves alone. Tokenizers that split text into such words before merging (GPT-2's
pre-tokenizer, SentencePiece's spaces) encode ' w1 w2 ... wn' as those n tokens, which build() checks by
encoding the result, trimming or padding it until the count is exact. Each prompt draws its own random words, so
prompts share no prefix and a prefix cache cannot shortcut their prefill.
"""

from __future__ import annotations

import re

import numpy as np
import tokenizers

_WORD = re.compile(r'^ ([A-Za-z]{1,12}|[0-9]{1,6}|[^\sA-Za-z0-9]{1,6})$')
MIN_WORDS = 8


def single_token_words(tokenizer: tokenizers.Tokenizer) -> list[str]:
  """' word' strings that the tokenizer encodes as one token, sorted (so a seed picks the same ones)."""
  words = set()
  for token_id in tokenizer.get_vocab().values():
    text = tokenizer.decode([token_id])
    if not _WORD.match(text):
      text = ' ' + text
      if not _WORD.match(text):
        continue
    if tokenizer.encode(text, add_special_tokens=False).ids == [token_id]:
      words.add(text)
  if len(words) < MIN_WORDS:
    raise ValueError(f'the tokenizer has {len(words)} single-token words (need {MIN_WORDS}): give the '
                     "server's own tokenizer (a tokenizer.json or its directory) with --tokenizer.")
  return sorted(words)


class PromptBuilder:
  """Builds prompts of exactly n tokens (as the tokenizer counts them, special tokens not included)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, seed: int = 0):
    self.tokenizer = tokenizer
    self.words = single_token_words(tokenizer)
    self.seed = seed

  def count(self, text: str) -> int:
    return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

  def build(self, n: int, index: int, salt: int = 0) -> str:
    """The prompt of request `index`: its words depend only on the seed, the index and `salt` (another
    salt gives other words, so a rerun of the same workload does not hit the server's prefix cache)."""
    if n < 1:
      raise ValueError(f'prompt of {n} tokens: give at least 1.')
    rng = np.random.default_rng([self.seed, salt, index])
    words = [self.words[i] for i in rng.integers(0, len(self.words), n)]
    for _ in range(8):  # words that merge across a space (some tokenizers do) need a few corrections
      text = ''.join(words)
      have = self.count(text)
      if have == n:
        return text
      if have > n:
        words = words[:len(words) - max(1, (have - n) // 2)]
      else:
        words += [self.words[i] for i in rng.integers(0, len(self.words), n - have)]
    raise ValueError(f'could not build a prompt of exactly {n} tokens with this tokenizer (got {have}).')


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """A tokenizer.json, or the directory of one (a checkpoint or Hugging Face model directory)."""
  from data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.load(path)
