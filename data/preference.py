"""Preference pairs for DPO: `stoker prepare --format preference` and the batches the train step reads.

A row of the input JSONL is {"prompt", "chosen", "rejected"}: text (the response follows the prompt
as written), or chat (`prompt` a list of messages, each response a string or a one-message assistant
list; rendered with the chat template as data/chat.py renders conversations). A row becomes two
documents, 2i (prompt + chosen) and 2i + 1 (prompt + rejected), whose prompt tokens the loss skips
(stored as -1 - id, as chat data is). Rows are deduplicated and split between train and validation
whole, so a pair never straddles the splits.

Batches hold pairs unpacked, each sequence from position 0, padded (segment 0) or cut at the
sequence length: rows [0, P) are the chosen responses of P pairs and rows [P, 2P) the rejected
ones, in the same order. Gradient accumulation keeps pairs together when P is a multiple of the
microbatches (train/step.py microbatch i takes rows i, i + k, ...). The order is a seeded
permutation of the pairs per epoch; the iterator's state is its step.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from data import chat
from data.source import ParquetTokenSource
from data.synthetic import Batch, pack_rows

KEYS = ('prompt', 'chosen', 'rejected')
STATE_FORMAT = 'stoker-preference-v1'


def check_row(row: Any, where: str) -> dict:
  """A row as {'prompt', 'chosen', 'rejected'}, text or chat, or ValueError naming what is wrong."""
  if not isinstance(row, dict) or any(k not in row for k in KEYS):
    raise ValueError(f'{where}: a preference row needs "prompt", "chosen" and "rejected"; got keys '
                     f'{sorted(row) if isinstance(row, dict) else type(row).__name__}.')
  if isinstance(row['prompt'], str):
    if not all(isinstance(row[k], str) for k in ('chosen', 'rejected')):
      raise ValueError(f'{where}: with a text prompt, "chosen" and "rejected" must be strings.')
    if row['chosen'] == row['rejected']:
      raise ValueError(f'{where}: "chosen" and "rejected" are the same text; the pair teaches nothing.')
    return {k: row[k] for k in KEYS}
  prompt = row['prompt']
  out = {'prompt': prompt}
  for k in ('chosen', 'rejected'):
    response = row[k]
    if isinstance(response, list) and len(response) == 1 and isinstance(response[0], dict):
      response = response[0].get('content') if response[0].get('role') == 'assistant' else None
    if not isinstance(response, str):
      raise ValueError(f'{where}: "{k}" must be a string or one assistant message.')
    out[k] = response
  chat.check_conversation(prompt + [{'role': 'assistant', 'content': out['chosen']}], where)
  return out


def encode_pair(tokenizer, template: chat.ChatTemplate | None, row: dict, eos_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(prompt + chosen, prompt + rejected) token ids, EOS last, the prompt's stored as -1 - id."""
  if isinstance(row['prompt'], str):
    tokenizer.encode_special_tokens = True  # plain text, as data/tokenizer.encode reads it
    prompt = np.asarray(tokenizer.encode(row['prompt'], add_special_tokens=False).ids, np.int32)
    out = []
    for k in ('chosen', 'rejected'):
      response = tokenizer.encode(row[k], add_special_tokens=False).ids + [eos_id]
      out.append(np.concatenate([-1 - prompt, np.asarray(response, np.int32)]))
    return out[0], out[1]
  template = template or chat.ChatTemplate()
  return tuple(chat.encode_conversation(
      tokenizer, template, row['prompt'] + [{'role': 'assistant', 'content': row[k]}], eos_id)
      for k in ('chosen', 'rejected'))


def rows_text(row: dict) -> str:
  """The canonical text of a row: what deduplication and the split see."""
  return json.dumps(row, ensure_ascii=False, sort_keys=True)


class PreferenceBatches:
  """Endless batches of `pairs` preference pairs ([2 * pairs, seq_len] arrays; see the module doc)."""

  def __init__(self, source: ParquetTokenSource, *, seq_len: int, pairs: int, seed: int = 0):
    if len(source) % 2:
      raise ValueError(f'{source.data_dir}/{source.split}: {len(source)} documents; a preference '
                       'dataset holds pairs (2i chosen, 2i + 1 rejected). Re-run stoker prepare '
                       '--format preference.')
    if pairs < 1 or seq_len < 1:
      raise ValueError(f'need pairs >= 1 and seq_len >= 1; got {pairs}, {seq_len}.')
    self.source, self.seq_len, self.pairs, self.seed = source, seq_len, pairs, seed
    self._n = len(source) // 2
    self._step = 0
    self._epoch, self._perm = -1, None

  def get_state(self) -> dict:
    """JSON, as data/checkpoint.py saves an iterator's state (one process)."""
    return {'format': STATE_FORMAT, 'step': self._step, 'process_index': 0, 'process_count': 1,
            'config': self._config()}

  def set_state(self, state: dict) -> None:
    if state.get('format') != STATE_FORMAT or state.get('config') != self._config():
      raise ValueError(f'the saved data state ({state.get("format")}, {state.get("config")}) is not '
                       f'of these preference batches ({self._config()}); resume with the data and '
                       'batch shape the run started with.')
    self._step = int(state['step'])

  def _config(self) -> dict:
    return {'data': self.source.fingerprint, 'pairs': self.pairs, 'seq_len': self.seq_len,
            'seed': self.seed}

  def start_prefetch(self) -> None:
    pass

  def close(self) -> None:
    pass

  def __iter__(self):
    return self

  def _order(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self._n)
    return self._perm

  def __next__(self) -> Batch:
    first = self._step * self.pairs
    chosen = [self._pair(first + j) for j in range(self.pairs)]
    self._step += 1
    rows = [c for c, _ in chosen] + [r for _, r in chosen]
    L = self.seq_len + 1
    packed = np.zeros((3, len(rows), L), np.int32)  # tokens, segments, positions
    for b, ids in enumerate(rows):
      ids = ids[:L]
      packed[0, b, :len(ids)] = ids
      packed[1, b, :len(ids)] = 1
      packed[2, b, :len(ids)] = np.arange(len(ids))
    return pack_rows(*packed)

  def _pair(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    i = int(self._order(k // self._n)[k % self._n])
    return self.source[2 * i], self.source[2 * i + 1]
