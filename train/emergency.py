"""Just-in-time checkpoints of a multi-process job that lost a process: saves without collectives.

When one process of a data-parallel job dies, the survivors' next collective never completes and
Orbax can no longer save (its saves synchronise all processes). The survivors still hold a
consistent state: the loop's pre-step state, which the gradient pass does not donate. So each
survivor's watchdog writes what its own devices hold, with no barrier:

  <workdir>/emergency/<step>/process_<i>.npz   one copy of every distinct shard this process holds
  <workdir>/emergency/<step>/process_<i>.json  the shards' places, and every process's data state

Every process's data-iterator state must reach the survivors, whose own state is only theirs:
each process records its states for the next steps in <workdir>/emergency/data_process_<i>.json
before it dispatches the steps' gradient passes (DataStates), so whichever step a survivor is
stuck in, the dead process's state for it is on disk.

A restart assembles every array from the files of that step (any process's shards will do:
replicas are equal), if together they cover it (a dead process takes its fsdp shards with it, and
then the newest periodic checkpoint is used), and resumes from it when it is newer than the newest
Orbax checkpoint. Each file is written whole (storage.open: a temporary file renamed locally, one
upload to a bucket), the .json after its .npz, so a half-written file is never read.
"""

from __future__ import annotations

import io
import json
import logging
import re

import jax
import numpy as np

import storage

KEEP = 3  # data states per process: the steps a survivor can be stuck in are among the newest


def _root(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), 'emergency')


def _write_json(path: str, value) -> None:
  storage.write_text(path, json.dumps(value))


class DataStates:
  """This process's data-iterator state before each of the next steps, on disk for survivors."""

  def __init__(self, workdir: str):
    self.path = storage.join(_root(workdir), f'data_process_{jax.process_index()}.json')
    self.states: dict[int, object] = {}

  def record(self, states: dict[int, object]) -> None:
    self.states.update(states)
    for step in sorted(self.states)[:-KEEP]:
      del self.states[step]
    _write_json(self.path, {str(k): v for k, v in self.states.items()})


def save(workdir: str, step: int, state) -> str:
  """Writes this process's shards of `state` and every process's data state before `step`."""
  directory = storage.join(_root(workdir), str(step))
  name = storage.join(directory, f'process_{jax.process_index()}')
  arrays, places = {}, []
  for i, leaf in enumerate(jax.tree.leaves(state)):
    seen = set()
    for shard in leaf.addressable_shards:
      index = [list(s.indices(n)[:2]) for s, n in zip(shard.index, leaf.shape)]
      if str(index) not in seen:
        seen.add(str(index))
        value = np.asarray(shard.data)  # as unsigned ints of its width: np.load knows no bfloat16
        arrays[f'a{len(places)}'] = value.view(f'u{value.dtype.itemsize}')
        places.append({'leaf': i, 'index': index})
  data = {}
  for path in storage.glob(storage.join(_root(workdir), 'data_process_*.json')):
    states = json.loads(storage.read_text(path))
    if str(step) in states:
      data[path.rsplit('_', 1)[1].split('.')[0]] = states[str(step)]
  with storage.open(name + '.npz', 'wb') as f:
    np.savez(f, **arrays)
  _write_json(name + '.json', {'step': step, 'process_count': jax.process_count(),
                               'places': places, 'data': data})
  logging.warning('Emergency checkpoint of step %d: process %d wrote its %d shards to %s.', step,
                  jax.process_index(), len(places), directory)
  return directory


def latest(workdir: str) -> int | None:
  steps = [int(m.group(1)) for p in storage.glob(storage.join(_root(workdir), '*', 'process_*.json'))
           if (m := re.search(r'/(\d+)/process_\d+\.json$', p))]
  return max(steps, default=None)


def restore(workdir: str, step: int, target):
  """(state with the target's shardings, this process's data state) of emergency step `step`;
  ValueError if the saved shards do not cover every array or the process count changed."""
  directory = storage.join(_root(workdir), str(step))
  targets = jax.tree.leaves(target)
  full = [None] * len(targets)
  covered = [None] * len(targets)
  data = {}
  for meta_path in storage.glob(storage.join(directory, 'process_*.json')):
    meta = json.loads(storage.read_text(meta_path))
    if meta['process_count'] != jax.process_count():
      raise ValueError(f'{directory} was saved by a {meta["process_count"]}-process job; this one '
                       f'has {jax.process_count()}, so the data order cannot be kept.')
    data.update(meta['data'])
    arrays = np.load(io.BytesIO(storage.read_bytes(meta_path[:-len('.json')] + '.npz')))
    for k, place in enumerate(meta['places']):
      i, t = place['leaf'], targets[place['leaf']]
      if full[i] is None:
        full[i] = np.zeros(t.shape, t.dtype)
        covered[i] = np.zeros(t.shape, bool)
      index = tuple(slice(a, b) for a, b in place['index'])
      full[i][index] = arrays[f'a{k}'].view(t.dtype)
      covered[i][index] = True
  missing = [i for i, c in enumerate(covered) if c is None or not c.all()]
  if missing:
    raise ValueError(f'{directory}: the surviving processes held only part of {len(missing)} '
                     'arrays (sharded across processes).')
  lacking = [p for p in range(jax.process_count()) if str(p) not in data]
  if lacking:  # every process must decide alike, so check them all
    raise ValueError(f'{directory} has no data state of processes {lacking}.')
  leaves = [jax.make_array_from_callback(t.shape, t.sharding, lambda idx, a=a: a[idx])
            for t, a in zip(targets, full)]
  return jax.tree.unflatten(jax.tree.structure(target), leaves), data[str(jax.process_index())]


def restore_newer(workdir: str, orbax_step: int | None, target):
  """(step, state, this process's data state) of the newest emergency checkpoint, the one the
  survivors of a multi-process job's failure wrote, if it is newer than the newest Orbax step and
  whole; else None (a single process never has one). Logs which it resumes from."""
  step = latest(workdir) if jax.process_count() > 1 else None
  if step is None or (orbax_step is not None and step <= orbax_step):
    return None
  try:
    state, data_state = restore(workdir, step, target)
  except ValueError as e:
    logging.warning('%s Resuming from the newest periodic checkpoint instead.', e)
    return None
  logging.info('Resumed from the emergency checkpoint of step %d in %s (saved by the processes '
               'that survived a failure).', step, workdir)
  return step, state, data_state
