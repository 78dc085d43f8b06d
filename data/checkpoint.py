"""Orbax integration: the data iterator's state, saved beside the train state in one checkpoint.

  mngr = ocp.CheckpointManager(workdir)
  mngr.save(step, args=ocp.args.Composite(state=..., data=PipelineSave(iterator)))
  # or PipelineSave(state=an earlier iterator.get_state()), e.g. the state before a failed step
  mngr.restore(step, args=ocp.args.Composite(state=..., data=PipelineRestore(iterator)))

Every process writes its own `process-<p>-of-<n>.json` (its streams); a restore reads all the files
and merges them, so a run may resume with another process count (see data/pipeline.py).
Kept apart from data/pipeline.py so that grain worker processes never import Orbax.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from data.pipeline import PipelineIterator, merge_states

_FILE = re.compile(r'process-(\d+)-of-(\d+)\.json')


class PipelineCheckpointHandler(ocp.CheckpointHandler):
  """Saves and restores a data.pipeline.PipelineIterator's state (JSON, one file per process)."""

  def save(self, directory: epath.Path, args: PipelineSave) -> None:
    state = args.iterator.get_state() if args.state is None else args.state
    name = f'process-{state["process_index"]}-of-{state["process_count"]}.json'
    (epath.Path(directory) / name).write_text(json.dumps(state))

  def restore(self, directory: epath.Path, args: PipelineRestore | None = None) -> Any:
    files = {}
    for path in epath.Path(directory).iterdir():
      m = _FILE.fullmatch(path.name)
      if m:
        files[(int(m[1]), int(m[2]))] = path
    counts = {n for _, n in files}
    if len(counts) != 1 or {p for p, _ in files} != set(range(counts.pop())):
      raise ValueError(f'{directory}: expected process-<p>-of-<n>.json for every p < n of one n, '
                       f'found {sorted(p.name for p in files.values())}.')
    states = [json.loads(files[k].read_text()) for k in sorted(files)]
    merged = states[0] if len(states) == 1 else merge_states(states)
    if args is None:
      return merged
    args.iterator.set_state(merged)
    args.iterator.start_prefetch()
    return args.iterator

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def structure(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(PipelineCheckpointHandler, for_save=True)
@dataclasses.dataclass
class PipelineSave(ocp.args.CheckpointArgs):
  """Saves `state` if given (a get_state() dict), else the iterator's current state."""
  iterator: PipelineIterator | None = None
  state: dict | None = None


@ocp.args.register_with_handler(PipelineCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class PipelineRestore(ocp.args.CheckpointArgs):
  iterator: PipelineIterator
