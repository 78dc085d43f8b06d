"""Orbax checkpoints of a training run: train state, data-iterator state and config, in one.

<workdir>/checkpoints/<step>/ holds three items:
  state   the TrainState (params, optimizer state, step), one array file set per leaf; restored
          onto whatever mesh the resuming run has (Orbax reads each shard's slice: re-sharding
          across mesh shapes and device counts needs no conversion step);
  data    the data iterator's JSON state (data/checkpoint.py), so a resumed run sees the batches
          an uninterrupted run would have seen;
  config  the TrainConfig, the model config and the operative gin config, as JSON.
Orbax writes each step into a temporary directory and renames it when every item is complete,
so a save cut short (even by SIGKILL) leaves nothing a restore would pick up; leftover temporary
directories are removed when the manager next opens. A bucket workdir (gs://, s3://; storage/) has no
atomic rename: there Orbax writes the step in place and its commit marker (commit_success.txt) last,
and a step without the marker is not a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from data.checkpoint import PipelineRestore, PipelineSave
import storage
from models.config import ModelConfig
from train.config import CheckpointConfig, TrainConfig


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), 'checkpoints')


def manager_options(workdir: str, **kwargs) -> ocp.CheckpointManagerOptions:
  """Orbax options for `workdir`: in a bucket, the commit-file protocol (buckets have no rename)."""
  if storage.is_bucket(workdir):
    storage.configure_tensorstore()
    kwargs['atomicity_options'] = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
  return ocp.CheckpointManagerOptions(**kwargs)


class Checkpoints:
  """The run's one CheckpointManager. Saves are async unless asked to wait."""

  def __init__(self, workdir: str, cfg: CheckpointConfig, train_cfg: TrainConfig,
               config_text: str = ''):
    self.cfg = cfg
    self._config = {'train': dataclasses.asdict(train_cfg), 'gin': config_text}
    self._model = json.loads(json.dumps(dataclasses.asdict(train_cfg.model), default=str))
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=manager_options(
            workdir, max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, *, wait: bool = False) -> None:
    """Saves `state` as step `step`; `data_state` is the iterator's state before batch `step`."""
    items = {'state': ocp.args.StandardSave(state),
             'config': ocp.args.JsonSave(json.loads(json.dumps(self._config, default=str)))}
    if data_state is not None:
      items['data'] = PipelineSave(state=data_state)
    if step in self.manager.all_steps():
      logging.info('Checkpoint %d exists already; not saving it again.', step)
    else:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state, data_iterator=None) -> tuple[Any, dict | None]:
    """(state with the abstract state's shardings, merged data state or None) of step `step`.

    `data_iterator` (if it has get_state) is set to the saved position.
    """
    self._check_model(step)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    has_data = storage.isdir(storage.join(self._step_dir(step), 'data'))
    wants_data = data_iterator is not None and hasattr(data_iterator, 'set_state')
    if has_data and wants_data:
      items['data'] = PipelineRestore(data_iterator)
    elif wants_data:
      raise ValueError(f'checkpoint {step} in {self.manager.directory} has no data-iterator '
                       'state, so resuming would change the data order; start a new workdir.')
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    data_state = data_iterator.get_state() if 'data' in items else None
    return restored['state'], data_state

  def _check_model(self, step: int) -> None:
    """Restoring another model's arrays would fail deep inside Orbax; say what differs instead."""
    path = storage.join(self._step_dir(step), 'config', 'metadata')
    if not storage.exists(path):
      return
    saved = json.loads(storage.read_text(path))['train']['model']
    saved = json.loads(json.dumps(saved, default=str))
    # A field added to ModelConfig after the save is absent from it: the save had its default.
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(ModelConfig)
                                      if f.default is not dataclasses.MISSING}, default=str))
    saved = {**defaults, **saved}
    diff = {k: (saved.get(k), v) for k, v in self._model.items() if saved.get(k) != v}
    if diff:
      raise ValueError(
          f'{self.manager.directory} holds checkpoints of another model; (saved, now): ' +
          ', '.join(f'{k} {a!r} vs {b!r}' for k, (a, b) in diff.items()) +
          '. Use a new workdir, or the saved model config.')

  def _step_dir(self, step: int) -> str:
    return storage.join(str(self.manager.directory), str(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_arrays(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """(step, the saved TrainState as a tree of numpy arrays), for tests and tools."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir),
                                  item_handlers={'state': ocp.StandardCheckpointHandler()},
                                  options=manager_options(workdir, read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no complete checkpoint in {checkpoint_dir(workdir)}.')
  # On one local device, whatever devices (and processes) saved it.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = manager.item_metadata(step)['state']
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  return step, jax.tree.map(lambda x: x, restored['state'])
