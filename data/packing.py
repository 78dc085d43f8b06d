"""First-fit packing of documents into fixed-length rows, with segment ids and positions.

A document is cut into pieces of at most `row_len` tokens (the pipeline uses row_len = T + 1, so a
row yields T next-token pairs). A full piece is a row by itself. Any shorter piece goes into the
first open row with room for it. When none has room and `bins` rows are already open, the fullest
open row is closed first. A row that fills exactly is closed at once.
Rows come out in the order they close.

Pieces of one document never share a row's segment with another document: each piece is its
own segment (ids 1, 2, ... within the row, 0 = padding at the end), and positions restart at 0
in every piece. Restarting, rather than continuing a long document's positions across its pieces,
is deliberate: a piece attends only within its row, and rotary embeddings see only position
differences, so continued positions would change nothing but would exceed the row length.

The packer holds references to pieces, (ref, start, length), not tokens. Its state is
JSON-serializable, and a checkpoint stores which documents are half-packed, not their tokens.
"""

from __future__ import annotations

import collections
from typing import Callable

import numpy as np

Piece = tuple[int, int, int]  # (document ref, first token, length)


class FirstFitPacker:
  """Packs documents, given by ref and length, into rows of `row_len` tokens over <= `bins` open rows."""

  def __init__(self, row_len: int, bins: int):
    if row_len < 2 or bins < 1:
      raise ValueError(f'need row_len >= 2 and bins >= 1, got row_len={row_len}, bins={bins}.')
    self.row_len, self.bins = row_len, bins
    self.open: list[list[Piece]] = []  # open rows, in the order they opened
    self._free: list[int] = []  # free tokens in each open row
    self.ready: collections.deque[list[Piece]] = collections.deque()  # closed, not yet taken

  def add(self, ref: int, length: int) -> None:
    for start in range(0, length, self.row_len):
      n = min(self.row_len, length - start)
      self._place((ref, start, n))

  def _place(self, piece: Piece) -> None:
    n = piece[2]
    if n == self.row_len:
      self.ready.append([piece])
      return
    for b, free in enumerate(self._free):
      if n <= free:
        self.open[b].append(piece)
        self._free[b] -= n
        if not self._free[b]:
          self._close(b)
        return
    if len(self.open) == self.bins:
      self._close(int(np.argmin(self._free)))  # the fullest; the oldest among equals
    self.open.append([piece])
    self._free.append(self.row_len - n)

  def _close(self, b: int) -> None:
    self.ready.append(self.open.pop(b))
    self._free.pop(b)

  def flush(self) -> None:
    """Closes every open row (oldest first): at the end of a finite stream."""
    while self.open:
      self._close(0)

  def get_state(self) -> dict:
    return {'open': [[list(p) for p in row] for row in self.open],
            'ready': [[list(p) for p in row] for row in self.ready]}

  def set_state(self, state: dict) -> None:
    self.open = [[tuple(p) for p in row] for row in state['open']]
    self._free = [self.row_len - sum(p[2] for p in row) for row in self.open]
    self.ready = collections.deque([tuple(p) for p in row] for row in state['ready'])


def assemble_row(pieces: list[Piece], row_len: int, tokens_of: Callable[[int], np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, segment_ids, positions), each [row_len] int32, of one packed row; zero padding."""
  tokens = np.zeros(row_len, np.int32)
  segments = np.zeros(row_len, np.int32)
  positions = np.zeros(row_len, np.int32)
  t = 0
  for seg, (ref, start, n) in enumerate(pieces, 1):
    tokens[t:t + n] = tokens_of(ref)[start:start + n]
    segments[t:t + n] = seg
    positions[t:t + n] = np.arange(n)
    t += n
  return tokens, segments, positions


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
  """Share of a batch's input slots that hold document tokens (segment id != 0)."""
  return float(np.mean(batch['segment_ids'] != 0))
