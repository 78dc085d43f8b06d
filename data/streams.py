"""Streams: stream s packs documents s, s + S, s + 2S, ... of the global order into rows.

The grain side of data/pipeline.py (see its docstring for the design): `Stream` packs one stream
and holds its state; `StreamsDataset` is a grain IterDataset whose elements are a group of
streams' next rows with their states, and whose `set_slice` lets grain's mp_prefetch give each
worker process a share of the streams.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from data.packing import FirstFitPacker, assemble_row


class Stream:
  """Documents r, r + S, r + 2S, ... of the global order (S = stride), packed into rows."""

  def __init__(self, docs: grain.MapDataset, index: int, stride: int, row_len: int, bins: int,
               state: dict | None):
    self.index, self._docs, self._stride, self._row_len = index, docs, stride, row_len
    self._length = max(0, -(-(len(docs) - index) // stride))  # documents in this stream
    self._packer = FirstFitPacker(row_len, bins)
    self._next = 0
    self._tokens: dict[int, np.ndarray] = {}  # documents with pieces not yet emitted
    self._pending: dict[int, int] = {}  # their pieces not yet emitted
    if state is not None:
      self.set_state(state)

  def _doc(self, i: int) -> np.ndarray:
    return self._docs[self.index + i * self._stride]

  def _hold(self, i: int, tokens: np.ndarray, pieces: int) -> None:
    self._tokens[i] = tokens
    self._pending[i] = self._pending.get(i, 0) + pieces

  def next_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(tokens, segments, positions) [T + 1] of the next row; None once a finite stream is done."""
    packer = self._packer
    while not packer.ready:
      if self._next >= self._length:
        if not packer.open:
          return None
        packer.flush()
        break
      tokens = self._doc(self._next)
      if len(tokens):
        self._hold(self._next, tokens, -(-len(tokens) // self._row_len))
        packer.add(self._next, len(tokens))
      self._next += 1
    pieces = packer.ready.popleft()
    row = assemble_row(pieces, self._row_len, self._tokens.__getitem__)
    for ref, _, _ in pieces:
      self._pending[ref] -= 1
      if not self._pending[ref]:
        del self._pending[ref], self._tokens[ref]
    return row

  def get_state(self) -> dict:
    return {'next': self._next, **self._packer.get_state()}

  def set_state(self, state: dict) -> None:
    self._next = int(state['next'])
    self._packer.set_state(state)
    self._tokens, self._pending = {}, {}
    for row in self._packer.open + list(self._packer.ready):
      for ref, _, _ in row:
        self._hold(ref, self._tokens.get(ref) if ref in self._tokens else self._doc(ref), 1)


class StreamStates:
  """The streams' states after an element, carried with it; grain passes it on as one leaf."""

  __slots__ = ('streams',)

  def __init__(self, streams: dict[int, dict]):
    self.streams = streams


class StreamsDataset(grain.IterDataset):
  """This process's (or worker's) rows of each global batch, with the streams' states.

  There are `stride` streams; each gives `per_batch` consecutive rows of every global batch, so
  row j of a global batch is row j % per_batch of stream j // per_batch's rows for that batch.
  `wanted` lists (stream, slots): the streams to pack and which of their rows to keep.
  Element k: 'step' (k, counted from the start of the run), 'rows' [r] (row ids in the global
  batch), 'done' [r] (the stream ran out: padding), 'packed' [3, r, T + 1] int32 (tokens,
  segment ids, positions), 'states' (StreamStates after this batch).
  """

  def __init__(self, docs: grain.MapDataset, stride: int, per_batch: int, row_len: int, bins: int,
               wanted: list[tuple[int, tuple[int, ...]]], states: dict[int, dict], step: int):
    super().__init__()
    self._docs, self._stride, self._per_batch = docs, stride, per_batch
    self._row_len, self._bins = row_len, bins
    self._wanted, self._states, self._step = list(wanted), states, step

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Called by grain's mp_prefetch in worker w of W with slice(w, None, W): its streams."""
    del sequential_slice
    self._wanted = self._wanted[sl]

  def __iter__(self) -> StreamsIterator:
    return StreamsIterator(self)

  def __str__(self) -> str:
    return f'StreamsDataset(streams={[s for s, _ in self._wanted[:4]]}..., step={self._step})'


class StreamsIterator(grain.DatasetIterator):

  def __init__(self, ds: StreamsDataset):
    super().__init__()
    self._ds = ds
    self.set_state({'step': ds._step, 'streams': ds._states})

  def __next__(self) -> dict[str, Any]:
    q, ids, rows = self._ds._per_batch, [], []
    for stream, (_, slots) in zip(self._streams, self._ds._wanted):
      made = [stream.next_row() for _ in range(q)]
      ids += [stream.index * q + slot for slot in slots]
      rows += [made[slot] for slot in slots]
    packed = np.zeros((3, len(rows), self._ds._row_len), np.int32)  # tokens, segments, positions
    for i, row in enumerate(rows):
      if row is not None:
        packed[:, i] = row
    self._states = {s.index: s.get_state() for s in self._streams}
    element = {'step': self._step, 'rows': np.array(ids, np.int64),
               'done': np.array([r is None for r in rows]), 'packed': packed,
               'states': StreamStates(self._states)}
    self._step += 1
    return element

  def get_state(self) -> dict:
    return {'step': self._step, 'streams': {str(k): v for k, v in self._states.items()}}

  def set_state(self, state: dict) -> None:
    ds, streams = self._ds, {int(k): v for k, v in state['streams'].items()}
    self._step = int(state['step'])
    self._streams = [Stream(ds._docs, r, ds._stride, ds._row_len, ds._bins, streams.get(r))
                     for r, _ in ds._wanted]
    self._states = {s.index: s.get_state() for s in self._streams}
