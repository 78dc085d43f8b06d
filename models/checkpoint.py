"""Reads a trained model out of a training checkpoint: its ModelConfig and its params, nothing else.

A training run's <workdir>/checkpoints/<step>/ (train/checkpoint.py writes it) holds the items
'state' (the TrainState: step, params, opt_state), 'data' and 'config' (JSON: {'train': the
TrainConfig as a dict, its 'model' the ModelConfig fields; 'gin': the operative gin text}). Serving
needs only the model: this module restores the params subtree of 'state' alone (Orbax partial
restore; the optimizer moments are never read) onto whatever shardings the caller's abstract
params carry. It lives below train/ and serve/ so both can use it (DESIGN.md layering).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

import storage
from models.config import ModelConfig, RopeScaling


def step_dir(path: str, step: int | None = None) -> str:
  """The checkpoint directory of one step, given a workdir, its checkpoints/ folder or a step folder.

  The newest complete step unless `step` is given. FileNotFoundError names what was looked for.
  """
  path = storage.absolute(path)
  if storage.isdir(storage.join(path, 'state')) and storage.isdir(storage.join(path, 'config')):
    if step is not None and storage.basename(path) != str(step):
      raise ValueError(f'{path} is the checkpoint of step {storage.basename(path)}, not {step}.')
    return path
  storage.check(path)  # an unusable bucket: a StorageError naming the fix, not "no such directory"
  root = storage.join(path, 'checkpoints') if storage.isdir(storage.join(path, 'checkpoints')) else path
  if not storage.isdir(root):
    raise FileNotFoundError(f'checkpoint {path!r}: no such directory; give a training workdir, its '
                            f'checkpoints/ folder or one step folder in it.')
  # A step folder counts once Orbax finished it: renamed from its temporary name, or in a bucket (no
  # rename) once it holds Orbax's commit marker.
  done = (lambda n: storage.isfile(storage.join(root, n, 'commit_success.txt'))) if storage.is_bucket(root) else (
      lambda n: os.path.isdir(os.path.join(root, n, 'state')))
  steps = sorted(int(n) for n in storage.listdir(root) if n.isdigit() and done(n))
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint in {root!r} (expected <step>/state and '
                            f'<step>/config folders, as `stoker train` writes them).')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f'no checkpoint of step {step} in {root!r}; it holds steps {steps}.')
  return storage.join(root, str(step))


def saved_config(directory: str) -> dict[str, Any]:
  """The 'config' item of a step's checkpoint: {'train': {...}, 'gin': '...'}."""
  path = storage.join(directory, 'config', 'metadata')
  if not storage.isfile(path):
    raise FileNotFoundError(f'{directory} has no config item ({path}); it was not written by '
                            f'`stoker train`, so its model config is unknown.')
  return json.loads(storage.read_text(path))


def model_config(saved: dict[str, Any]) -> ModelConfig:
  """The ModelConfig recorded in a saved config (see saved_config)."""
  try:
    fields = dict(saved['train']['model'])
  except (KeyError, TypeError) as e:
    raise ValueError(f"saved config has no ['train']['model'] entry ({e!r}); keys: "
                     f'{sorted(saved) if isinstance(saved, dict) else type(saved)}.') from e
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'saved model config has fields {unknown} that this ModelConfig lacks; serve it '
                     f'with the Stoker version that trained it.')
  if fields.get('rope_scaling') is not None:
    fields['rope_scaling'] = RopeScaling(**fields['rope_scaling'])
  return ModelConfig(**fields)


def restore_params(directory: str, abstract_params: Any) -> Any:
  """The params of a step's checkpoint, laid out on the shardings of `abstract_params`.

  `abstract_params` is the nnx.State of models.transformer.Transformer with a
  jax.ShapeDtypeStruct (carrying `.sharding`) per leaf. Only this subtree of the 'state' item is
  read; each device reads its own slice, so any mesh can restore any checkpoint.
  """
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype),
                              abstract_params)
  args = ocp.args.PyTreeRestore(item={'params': abstract_params},
                                restore_args={'params': restore_args}, partial_restore=True)
  if storage.is_bucket(directory):
    storage.configure_tensorstore()
  try:
    restored = ocp.PyTreeCheckpointer().restore(storage.join(directory, 'state'), args=args)
  except (ValueError, KeyError) as e:
    raise ValueError(f'the params in {directory} do not match the model config it records ({e}); '
                     f'the checkpoint may be damaged or written by another Stoker version.') from e
  return restored['params']
