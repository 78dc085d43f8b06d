"""Reading a model out of a Stoker training checkpoint or a Hugging Face directory, and exporting one.

Below train/ and serve/ (DESIGN.md): serving loads weights through `load`, `stoker convert --to-hf`
through `to_hf`, and neither needs the training code. A training checkpoint is
<workdir>/checkpoints/<step>/{state, config[, data]} (train/checkpoint.py); models/checkpoint.py
reads only its parameters (an Orbax partial restore), placed on the shardings the caller asks for.
A workdir made by `stoker convert --from-hf` also holds hf/: the original config.json and
tokenizer files, carried back out by `to_hf`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from typing import Any, Callable

import jax
from flax import nnx

import storage
from models import checkpoint as model_checkpoint
from models import hf, hf_files, lora, peft_files, transformer
from models.config import ModelConfig

HF_SUBDIR = 'hf'  # in a workdir: the Hugging Face config and tokenizer files it came from

ShardingsFor = Callable[[nnx.State], Any]  # abstract params -> a matching tree of shardings


def is_hf_dir(path: str) -> bool:
  return storage.isfile(storage.join(path, 'config.json')) and not storage.isdir(
      storage.join(path, 'checkpoints'))


def read_model_config(path: str, step: int | None = None) -> ModelConfig:
  """The ModelConfig a training checkpoint was saved with."""
  directory = model_checkpoint.step_dir(path, step)
  return model_checkpoint.model_config(model_checkpoint.saved_config(directory))


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of a Hugging Face directory or of a training workdir's newest checkpoint."""
  if is_hf_dir(path):
    return hf.config_from_hf(hf_files.read_config(storage.local_copy(path)))
  return read_model_config(path)


def abstract_params(cfg: ModelConfig) -> nnx.State:
  return nnx.state(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))


def read_params(path: str, step: int | None = None, *, shardings_for: ShardingsFor | None = None,
                **overrides) -> tuple[ModelConfig, nnx.State]:
  """(ModelConfig, params) of a training checkpoint; `overrides` replace execution fields of the
  saved config (e.g. dtype, attention); the architecture must stay the checkpoint's."""
  directory = model_checkpoint.step_dir(path, step)
  saved_config = model_checkpoint.saved_config(directory)
  adapter = (saved_config.get('train') or {}).get('lora') or {}
  if adapter.get('base'):
    return _read_merged(directory, lora.LoRAConfig(**adapter), shardings_for, overrides)
  cfg = dataclasses.replace(model_checkpoint.model_config(saved_config), **overrides)
  abstract = abstract_params(cfg)
  shardings = shardings_for(abstract) if shardings_for else jax.tree.map(
      lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return cfg, model_checkpoint.restore_params(directory, target)


def _read_merged(directory: str, config: lora.LoRAConfig, shardings_for: ShardingsFor | None,
                 overrides) -> tuple[ModelConfig, nnx.State]:
  """A LoRA run's checkpoint (its adapters) merged into its base: the fine-tuned model."""
  cfg, base = load(config.base, shardings_for=shardings_for, **overrides)
  adapters = restore_adapters(directory, cfg, config, shardings_for)
  return cfg, lora.merge(cfg, base, adapters, config)


def restore_adapters(directory: str, cfg: ModelConfig, config: lora.LoRAConfig,
                     shardings_for: ShardingsFor | None = None) -> nnx.State:
  """The adapters a LoRA run's checkpoint (a step directory) holds."""
  abstract = jax.eval_shape(lambda: lora.init_adapters(cfg, abstract_params(cfg), config,
                                                       jax.random.key(0)))
  shardings = shardings_for(abstract) if shardings_for else jax.tree.map(
      lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return model_checkpoint.restore_params(directory, target)


def lora_config(path: str, step: int | None = None) -> lora.LoRAConfig | None:
  """The LoRAConfig of a LoRA run's workdir (None for any other model)."""
  if is_hf_dir(path):
    return None
  saved = model_checkpoint.saved_config(model_checkpoint.step_dir(path, step))
  adapter = (saved.get('train') or {}).get('lora') or {}
  return lora.LoRAConfig(**adapter) if adapter.get('base') else None


def load(path: str, *, shardings_for: ShardingsFor | None = None,
         **overrides) -> tuple[ModelConfig, nnx.State]:
  """(ModelConfig, params) from a Hugging Face directory or a Stoker training checkpoint."""
  if not is_hf_dir(path):
    return read_params(path, shardings_for=shardings_for, **overrides)
  path = storage.local_copy(path)  # a bucket HF directory is downloaded once (safetensors reads local files)
  cfg = hf.config_from_hf(hf_files.read_config(path), **overrides)
  state = abstract_params(cfg)
  shardings = nnx.to_pure_dict(shardings_for(state)) if shardings_for else None
  _, params = hf_files.load_params(path, cfg, shardings=shardings)
  nnx.replace_by_pure_dict(state, params)
  return cfg, state


def to_hf(path: str, out_dir: str, *, step: int | None = None, dtype: str | None = None,
          tokenizer_dir: str | None = None, merge_lora: bool = False,
          max_shard_bytes: int = hf_files.DEFAULT_SHARD_BYTES) -> list[str]:
  """Exports a training checkpoint as a Hugging Face directory; returns the files written.

  config.json keeps the fields of the config the model was converted from (if any); tokenizer and
  chat-template files come from `tokenizer_dir`, else the workdir's hf/ directory (a LoRA run's:
  its base's). A LoRA run exports merged, and only when `merge_lora` says so.
  """
  directory = model_checkpoint.step_dir(path, step)
  adapter = lora_config(directory)
  if adapter is not None and not merge_lora:
    raise ValueError(f'{path} holds LoRA adapters over {adapter.base}: pass --merge-lora to export the '
                     'base with the adapters merged in, or use --to-peft to export the adapters alone.')
  cfg, params = read_params(directory)
  sidecar = _sidecar(adapter.base if adapter else directory)
  base = hf_files.read_config(storage.local_copy(sidecar)) if storage.isfile(
      storage.join(sidecar, 'config.json')) else None
  sources = [storage.local_copy(d) if storage.is_bucket(d) else d for d in (tokenizer_dir, sidecar) if d]
  with _output_dir(out_dir) as local:
    return hf_files.write(local, cfg, nnx.to_pure_dict(params), base_config=base, dtype=dtype,
                          max_shard_bytes=max_shard_bytes, files_from=sources)


@contextlib.contextmanager
def _output_dir(out_dir: str):
  """A local directory to write `out_dir`'s files into: `out_dir` itself, or for a bucket a temporary one
  uploaded when the block succeeds, config.json last (a directory without it is not a model)."""
  if not storage.is_bucket(out_dir):
    yield out_dir
    return
  storage.check(out_dir, write=True)
  with tempfile.TemporaryDirectory(prefix='stoker-convert-') as local:
    yield local
    names = sorted(os.path.relpath(os.path.join(d, n), local) for d, _, files in os.walk(local) for n in files)
    for name in sorted(names, key=lambda n: n == 'config.json'):
      storage.put_file(os.path.join(local, name), storage.join(out_dir, *name.split(os.sep)))


def _sidecar(path: str) -> str:
  """Where a model's Hugging Face config and tokenizer files are: an HF directory itself, or a
  workdir's hf/ folder (given the workdir or one of its step directories)."""
  if is_hf_dir(path):
    return path
  directory = model_checkpoint.step_dir(path)
  return storage.join(storage.dirname(storage.dirname(directory)), HF_SUBDIR)


def to_peft(path: str, out_dir: str, *, step: int | None = None) -> list[str]:
  """Exports a LoRA run's adapters as a PEFT adapter directory (for the base's HF export)."""
  directory = model_checkpoint.step_dir(path, step)
  adapter = lora_config(directory)
  if adapter is None:
    raise ValueError(f'{path} is not a LoRA run (its config has no lora.base); export the whole '
                     'model with --to-hf instead.')
  cfg = model_checkpoint.model_config(model_checkpoint.saved_config(directory))
  adapters = restore_adapters(directory, cfg, adapter)
  with _output_dir(out_dir) as local:
    return peft_files.write(local, cfg, adapters, adapter, base_model=adapter.base)
