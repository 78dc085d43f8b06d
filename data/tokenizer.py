"""Hugging Face `tokenizers` for `stoker prepare`: train a byte-level BPE, or load a tokenizer.json; encode.

Training is deterministic for a given input order (checked by running it twice, with Rayon on 1 and 2 threads:
the serialised tokenizers are byte-identical). Encoding uses `encode_batch_fast`, which runs on all cores on
Rust (Rayon) threads.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import tokenizers
import tqdm
from tokenizers import decoders, models, pre_tokenizers, trainers

import storage

EOS_TOKEN = '<|endoftext|>'
# Looked for, in order, in a loaded tokenizer when --eos-token is not given.
EOS_CANDIDATES = (EOS_TOKEN, '<|end_of_text|>', '</s>', '<eos>')
MIN_VOCAB = 257  # the 256 byte-level symbols and the end-of-text token
_ENCODE_BATCH = 64  # documents per encode_batch call: bounds memory and paces the progress bar


def train_bpe(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
  """A byte-level BPE with `vocab_size` entries (fewer if the corpus has fewer merges); EOS_TOKEN is id 0."""
  if vocab_size < MIN_VOCAB:
    raise ValueError(f'--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} '
                     f'(256 bytes + {EOS_TOKEN})')
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=sys.stderr.isatty())
  tokenizer.train_from_iterator(texts, trainer, length=len(texts))
  return tokenizer


def load_path(path: str) -> str:
  """`path` itself, or the tokenizer.json inside it if it is a directory."""
  return storage.join(path, 'tokenizer.json') if storage.isdir(path) else path


def load(path: str) -> tokenizers.Tokenizer:
  """Loads `path`, a tokenizer.json or a directory holding one."""
  path = load_path(path)
  if not storage.isfile(path):
    raise FileNotFoundError(f'--tokenizer {path!r}: no such file: give a Hugging Face tokenizer.json, '
                            f'or use --train-tokenizer --vocab-size N')
  try:
    return tokenizers.Tokenizer.from_str(storage.read_text(path))
  except Exception as e:  # tokenizers raises a bare Exception for any parse error
    raise ValueError(f'--tokenizer {path!r} is not a valid tokenizer.json ({e}): give a Hugging Face '
                     f'tokenizer.json, or use --train-tokenizer') from e


def vocab_size(tokenizer: tokenizers.Tokenizer) -> int:
  """One past the largest token id: the smallest model vocab_size (embedding rows) that covers every id."""
  return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def check_vocab_size(tokenizer_vocab: int, model_vocab: int | None) -> None:
  if model_vocab is not None and tokenizer_vocab > model_vocab:
    raise ValueError(f"tokenizer vocabulary {tokenizer_vocab} exceeds the model's vocab_size {model_vocab}: "
                     f'train a smaller tokenizer with --vocab-size or raise model.vocab_size')


def eos(tokenizer: tokenizers.Tokenizer, eos_token: str | None = None) -> tuple[str, int]:
  """The end-of-text token appended to each document, and its id."""
  candidates = (eos_token,) if eos_token else EOS_CANDIDATES
  for token in candidates:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token, token_id
  if eos_token:
    raise ValueError(f'--eos-token {eos_token!r} is not in the tokenizer\'s vocabulary: give one that is')
  raise ValueError(f'the tokenizer has none of the end-of-text tokens {", ".join(EOS_CANDIDATES)}: '
                   f'name its end-of-text token with --eos-token')


def encode(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], eos_id: int) -> list[np.ndarray]:
  """Each text's token ids (int32) followed by `eos_id`; no other special tokens are added.

  Special-token strings inside a text (a document quoting '<|endoftext|>') are encoded as plain text, so that the
  only EOS ids are the ones appended and decoding gives the text back.
  """
  out = []
  tokenizer.encode_special_tokens = True  # not serialised: the saved tokenizer.json is unchanged
  with tqdm.tqdm(total=len(texts), desc='tokenize', unit='doc', disable=not sys.stderr.isatty()) as bar:
    for start in range(0, len(texts), _ENCODE_BATCH):
      batch = texts[start:start + _ENCODE_BATCH]
      for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
        ids = np.empty(len(encoding.ids) + 1, np.int32)
        ids[:-1] = encoding.ids
        ids[-1] = eos_id
        out.append(ids)
      bar.update(len(batch))
  return out
