"""The Grain pipeline: shuffled documents -> packed rows -> per-process batches, checkpointable.

Design. The split's global order is grain's `MapDataset.shuffle(seed).repeat(num_epochs)` over the
source, so each epoch is a fresh permutation. It is dealt to S streams: stream s holds the
documents at positions s, s + S, s + 2S, ..., packed first-fit into rows of T + 1 tokens
(data/packing.py). Each stream gives q = B / S consecutive rows of every global batch of
B = global_batch_size rows. The global batches therefore depend only on (data, seed, B, T, S,
bins), never on how many processes or workers produce them:
- Process p of n owns rows [p B/n, (p+1) B/n) of every global batch, a contiguous block, which is
  the layout `jax.make_array_from_process_local_data` expects. It packs the streams those rows
  come from. With the training default S = B, every process reads only its own documents.
- Grain worker processes (`mp_prefetch`, worker_count >= 1) split the process's streams between
  them through `set_slice`. Each worker makes its rows of every batch, and the main process
  stitches them together. The batches are the same for any worker_count.
- The iterator state is {step, state of each stream}. A stream's state is its next document and
  the pieces of its open rows, as references: JSON, a few numbers per stream. A checkpoint holds
  one file per process (data/checkpoint.py), and a restore merges all of them (`merge_states`).
  Any process count that divides B therefore resumes at exactly the next global batch, with the
  same rows split differently: no document is repeated or skipped.

Finite iteration (num_epochs set). A stream that runs out yields padding rows (segment 0,
loss_mask 0), and the iterator stops after the last global batch that holds any token, so every
token is seen once. Every process stops at that same step, so collective steps stay in lockstep.
A process whose own streams run out first yields all-padding batches until then. To find that
step, it packs the lengths of every stream once, which is one pass over the split.
Streams end unevenly: a corpus with few long documents would pad many trailing batches with S = B.
An ordered finite pass (num_epochs=1, shuffle=False: evaluation) therefore defaults to S = 1.
That is one global packing order, so only the last batch is partial, and every process reads the
whole split.

Cost: each document is read once per epoch by each process that packs its stream. Under a global
shuffle a read decodes a whole row group (<= 256 documents) unless the source's cache holds it
(data/source.py): see benchmarks/data_throughput.py for both cases.
"""

from __future__ import annotations

import atexit
import weakref

import grain
import numpy as np
from grain.experimental import DatasetOptions, ThreadPrefetchIterDataset, WithOptionsIterDataset

from data.packing import FirstFitPacker
from data.source import ParquetTokenSource, open_split
from data.streams import StreamStates, StreamsDataset
from data.synthetic import Batch, pack_rows

STATE_FORMAT = 'stoker-pipeline-v1'

# Iterators with a prefetch thread or worker processes. Closed at exit: grain's own clean-up during
# interpreter shutdown fails noisily, or aborts when a prefetch thread is still running.
_OPEN: weakref.WeakSet[PipelineIterator] = weakref.WeakSet()


class PipelineIterator:
  """Per-process batches of packed documents (the data.synthetic batch format), checkpointable.

  `get_state()` is JSON; `set_state()` accepts this process's state or a merge of all processes'
  states (`merge_states`), also from a run with another process count. Close it (or use `with`)
  to stop worker processes.
  """

  def __init__(self, source: ParquetTokenSource, *, seq_len: int, global_batch_size: int,
               seed: int = 0, process_index: int | None = None, process_count: int | None = None,
               worker_count: int = 0, prefetch: int = 2, num_epochs: int | None = None,
               shuffle: bool = True, packing_bins: int = 8, streams: int | None = None):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top  (only for the defaults)
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if seq_len < 1 or global_batch_size < 1 or worker_count < 0 or prefetch < 0:
      raise ValueError(f'need seq_len, global_batch_size >= 1 and worker_count, prefetch >= 0; got '
                       f'{seq_len}, {global_batch_size}, {worker_count}, {prefetch}.')
    if not 0 <= process_index < process_count or global_batch_size % process_count:
      raise ValueError(f'global_batch_size ({global_batch_size}) must be a multiple of the process '
                       f'count ({process_count}), and 0 <= process_index ({process_index}) < it.')
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f'num_epochs must be None (endless) or >= 1, got {num_epochs}.')
    if streams is None:
      streams = 1 if num_epochs is not None and not shuffle else global_batch_size
    if streams < 1 or global_batch_size % streams:
      raise ValueError(f'streams ({streams}) must divide global_batch_size ({global_batch_size}).')
    self.source, self.seq_len = source, seq_len
    self.process_index, self.process_count = process_index, process_count
    self.batch_size = global_batch_size // process_count  # rows per process
    docs = grain.MapDataset.source(source)
    self._docs = (docs.shuffle(seed=seed) if shuffle else docs).repeat(num_epochs)
    self._config = {'data': source.fingerprint, 'documents': len(source), 'seq_len': seq_len,
                    'global_batch_size': global_batch_size, 'seed': seed, 'shuffle': shuffle,
                    'num_epochs': num_epochs, 'packing_bins': packing_bins, 'streams': streams}
    self._bins, self._prefetch = packing_bins, prefetch
    self._streams, self._per_batch = streams, global_batch_size // streams
    wanted: dict[int, list[int]] = {}  # stream -> which of its rows in each batch are ours
    first = process_index * self.batch_size
    for j in range(first, first + self.batch_size):
      wanted.setdefault(j // self._per_batch, []).append(j % self._per_batch)
    self._wanted = [(r, tuple(slots)) for r, slots in sorted(wanted.items())]
    self._stream_ids = [r for r, _ in self._wanted]
    self._workers = min(worker_count, len(self._wanted))  # each worker needs a stream
    self._step, self._states = 0, {r: None for r in self._stream_ids}
    self._latest: list[StreamStates] = []  # states carried by the last batch's parts, not yet merged
    self._it, self._exhausted = None, False
    self._filled = self._slots = 0
    self._total: int | None = None  # global batches of a finite run, once needed

  @property
  def step(self) -> int:
    """Global batches consumed so far."""
    return self._step

  @property
  def packing_efficiency(self) -> float:
    """Share of the input slots of the batches so far that hold document tokens."""
    return self._filled / self._slots if self._slots else float('nan')

  def __iter__(self) -> PipelineIterator:
    return self

  def start_prefetch(self) -> None:
    """Starts the workers (and their prefetching) now rather than at the first `next`."""
    if self._it is None:
      ds = StreamsDataset(self._docs, self._streams, self._per_batch, self.seq_len + 1,
                          self._bins, self._wanted, self._states, self._step)
      if self._workers:
        _absl_flags_parsed()
        # Small arrays travel pickled: a shared-memory block per array costs more below ~1 MiB.
        ds = WithOptionsIterDataset(ds, DatasetOptions(min_shm_size=1 << 20))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self._workers, per_worker_buffer_size=max(1, self._prefetch)))
      elif self._prefetch:
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self._prefetch)
      self._it = iter(ds)
      _OPEN.add(self)
    self._it.start_prefetch()

  def __next__(self) -> Batch:
    if self._exhausted:
      raise StopIteration
    self.start_prefetch()
    parts = [next(self._it) for _ in range(max(1, self._workers))]
    B, L = self.batch_size, self.seq_len + 1
    packed = np.zeros((3, B, L), np.int32)
    done, seen = np.zeros(B, bool), np.zeros(B, np.int64)
    for part in parts:
      rows = np.asarray(part['rows']) - self.process_index * B
      if part['step'] != self._step:
        raise RuntimeError(f'internal error: a worker sent step {part["step"]}, expected {self._step}.')
      packed[:, rows] = part['packed']
      done[rows] = part['done']
      seen[rows] += 1
    if not (seen == 1).all():
      raise RuntimeError(f'internal error: rows {np.flatnonzero(seen != 1)} came {seen} times.')
    if done.all() and (self.process_count == 1 or self._step >= self._global_steps()):
      self._exhausted = True
      self.close()
      raise StopIteration
    self._latest = [part['states'] for part in parts]
    self._step += 1
    batch = pack_rows(*packed)
    self._filled += int(np.count_nonzero(batch['segment_ids']))
    self._slots += batch['segment_ids'].size
    return batch

  def _global_steps(self) -> int:
    """Global batches of a finite run, the same on every process: set by the longest stream."""
    if self._total is None:
      S, most = self._streams, 0
      for r in range(S):
        packer, rows = FirstFitPacker(self.seq_len + 1, self._bins), 0
        for i, g in enumerate(range(r, len(self._docs), S)):
          packer.add(i, len(self._docs[g]))  # as Stream does, without assembling rows
          rows += len(packer.ready)
          packer.ready.clear()
        packer.flush()
        most = max(most, -(-(rows + len(packer.ready)) // self._per_batch))
      self._total = most
    return self._total

  def get_state(self) -> dict:
    """JSON: this process's streams after the batches consumed so far (prefetched ones excluded)."""
    for latest in self._latest:
      self._states.update(latest.streams)
    self._latest = []
    return {'format': STATE_FORMAT, 'config': dict(self._config), 'step': self._step,
            'process_index': self.process_index, 'process_count': self.process_count,
            'streams': {str(r): self._states[r] or _fresh() for r in self._stream_ids}}

  def set_state(self, state: dict) -> None:
    """Resumes after `state`'s step; it must hold this process's streams (any process layout)."""
    if state.get('format') != STATE_FORMAT:
      raise ValueError(f'not a {STATE_FORMAT} iterator state (format {state.get("format")!r}).')
    diff = {k: (state['config'].get(k), v) for k, v in self._config.items()
            if state['config'].get(k) != v}
    if diff:
      raise ValueError('the saved data iterator was made with other settings; resuming would '
                       'change the data order. (saved, now): ' +
                       ', '.join(f'{k} {a!r} vs {b!r}' for k, (a, b) in diff.items()))
    streams = {int(k): v for k, v in state['streams'].items()}
    missing = [r for r in self._stream_ids if r not in streams]
    if missing:
      raise ValueError(f'the state lacks streams {missing[:8]} of process {self.process_index}/'
                       f'{self.process_count}; restore from all processes\' states '
                       f'(data.pipeline.merge_states, as data.checkpoint does).')
    self.close()
    self._step = int(state['step'])
    self._states = {r: streams[r] for r in self._stream_ids}
    self._latest, self._exhausted = [], False

  def close(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def __enter__(self) -> PipelineIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@atexit.register
def _close_open_iterators() -> None:
  for it in list(_OPEN):
    it.close()


def _absl_flags_parsed() -> None:
  """grain's mp_prefetch reads an absl flag once JAX's profiler is loaded, and fails if absl never
  parsed flags (the `stoker` CLI uses argparse): mark them parsed, at their defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _fresh() -> dict:
  return {'next': 0, 'open': [], 'ready': []}


def merge_states(states: list[dict]) -> dict:
  """One state holding every stream, from the states of all processes of one checkpoint."""
  if not states:
    raise ValueError('no iterator states to merge.')
  first, streams = states[0], {}
  for s in states:
    for key in ('format', 'config', 'step'):
      if s.get(key) != first.get(key):
        raise ValueError(f'iterator states disagree on {key}: {first.get(key)!r} vs {s.get(key)!r}; '
                         'they are not from one checkpoint.')
    for k, v in s['streams'].items():
      if streams.setdefault(int(k), v) != v:
        raise ValueError(f'two iterator states hold different states of stream {k}.')
  missing = set(range(first['config']['streams'])) - set(streams)
  if missing:
    raise ValueError(f'the states lack streams {sorted(missing)[:8]}: a process\'s state is missing.')
  return {'format': first['format'], 'config': first['config'], 'step': first['step'],
          'streams': {str(k): streams[k] for k in sorted(streams)}}


def make_iterator(data_dir: str, split: str, *, seq_len: int, global_batch_size: int,
                  verify_checksums: bool = False, cache_bytes: int = 256 << 20,
                  **kwargs) -> PipelineIterator:
  """Batches of `split` in a `stoker prepare` directory; kwargs as PipelineIterator.

  Training: the defaults (endless, shuffled, one stream per row). Evaluation: num_epochs=1,
  shuffle=False (one stream: every token once, only the last batch partial).
  """
  source = open_split(data_dir, split, verify_checksums=verify_checksums, cache_bytes=cache_bytes)
  return PipelineIterator(source, seq_len=seq_len, global_batch_size=global_batch_size, **kwargs)

