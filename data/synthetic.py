"""A deterministic in-memory token stream with learnable structure, for smoke runs and tests.

Each document counts from a random start with a random stride (mod V), so the next token is
predictable from the previous two: a model's loss falls quickly from log(V) toward zero.
Documents are packed into rows with segment ids and per-document positions, in the same
batch format the Parquet pipeline produces.

Batch format (numpy, all [B, T]): inputs, targets (int32); loss_mask (float32, 0 where the
target belongs to another document or is padding); segment_ids (int32, 0 = padding,
1, 2, ... per document); positions (int32, restarting at 0 per document).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """Batch `i` is a pure function of (seed, i): resuming at step i needs no iterator state."""

  vocab_size: int
  seq_len: int
  batch_size: int
  seed: int = 0
  min_doc_len: int = 8
  max_doc_len: int = 96
  max_stride: int = 4

  def batch(self, index: int) -> Batch:
    rng = np.random.default_rng([self.seed, index])
    B, T = self.batch_size, self.seq_len
    tokens = np.zeros((B, T + 1), np.int32)
    segments = np.zeros((B, T + 1), np.int32)
    positions = np.zeros((B, T + 1), np.int32)
    for b in range(B):
      t, seg = 0, 1
      while t < T + 1:
        n = min(int(rng.integers(self.min_doc_len, self.max_doc_len + 1)), T + 1 - t)
        start, stride = rng.integers(0, self.vocab_size), rng.integers(1, self.max_stride + 1)
        tokens[b, t:t + n] = (start + stride * np.arange(n)) % self.vocab_size
        segments[b, t:t + n] = seg
        positions[b, t:t + n] = np.arange(n)
        t, seg = t + n, seg + 1
    return pack_rows(tokens, segments, positions)

  def __iter__(self) -> Iterator[Batch]:
    return self.iterate(0)

  def iterate(self, start: int) -> Iterator[Batch]:
    index = start
    while True:
      yield self.batch(index)
      index += 1


STATE_FORMAT = 'stoker-synthetic-v1'


class SyntheticIterator:
  """SyntheticData as a checkpointable iterator (the get_state/set_state of data.pipeline's)."""

  process_index, process_count = 0, 1

  def __init__(self, data: SyntheticData):
    self.data, self.step = data, 0

  def __iter__(self) -> SyntheticIterator:
    return self

  def __next__(self) -> Batch:
    self.step += 1
    return self.data.batch(self.step - 1)

  def get_state(self) -> dict:
    return {'format': STATE_FORMAT, 'config': dataclasses.asdict(self.data), 'step': self.step,
            'process_index': 0, 'process_count': 1}

  def set_state(self, state: dict) -> None:
    if state.get('format') != STATE_FORMAT or state['config'] != dataclasses.asdict(self.data):
      raise ValueError(f'not a state of this synthetic dataset: {state}; expected format '
                       f'{STATE_FORMAT} and config {dataclasses.asdict(self.data)}.')
    self.step = int(state['step'])

  def start_prefetch(self) -> None:
    pass

  def close(self) -> None:
    pass


def pack_rows(tokens, segments, positions) -> Batch:
  """Turns [B, T+1] packed rows into the next-token batch format (see the module docstring).
  A negative token is -1 - id of a token the loss skips (chat data: data/chat.py)."""
  trained = tokens >= 0
  tokens = np.where(trained, tokens, -1 - tokens)
  same_doc = (segments[:, :-1] == segments[:, 1:]) & (segments[:, 1:] != 0)
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'loss_mask': (same_doc & trained[:, 1:]).astype(np.float32),
      'segment_ids': segments[:, :-1],
      'positions': positions[:, :-1],
  }
