"""Hugging Face checkpoint directories: config.json + safetensors (one file, or shards with an index).

Reading is lazy and per tensor: headers give every name and shape up front (so a checkpoint that does
not fit its config fails before anything is loaded), and each Stoker parameter is built from its
tensors alone, cast, and placed on its devices (`shardings`) before the next is read; host memory
holds one parameter at a time. Writing streams the same way, one shard file at a time.
Only safetensors are read: pickle-based checkpoints (*.bin, *.pt) can run code when loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Mapping

import jax
import numpy as np
import safetensors
import safetensors.numpy

from models import hf
from models.config import ModelConfig

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
# Carried along unchanged both ways: tokenizer, chat template, generation defaults.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'chat_template.jinja', 'chat_template.json', 'generation_config.json',
                   'tokenizer.model', 'added_tokens.json', 'vocab.json', 'merges.txt')
DEFAULT_SHARD_BYTES = 5 * 2**30  # as transformers' save_pretrained


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{hf_dir} has no config.json; expected a Hugging Face model directory '
                            '(config.json + *.safetensors).')
  with open(path) as f:
    return json.load(f)


class Reader:
  """The tensors of a Hugging Face directory, read lazily by name."""

  def __init__(self, hf_dir: str):
    self.dir = hf_dir
    if os.path.isfile(os.path.join(hf_dir, INDEX)):
      with open(os.path.join(hf_dir, INDEX)) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
      files = [SINGLE]
    else:
      found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
      pickled = [n for n in found if n.endswith(('.bin', '.pt', '.pth', '.pkl'))]
      hint = (f' It holds pickle checkpoints {pickled[:3]}, which are never loaded (unpickling runs '
              'code); convert them to safetensors with transformers first.') if pickled else ''
      raise FileNotFoundError(f'{hf_dir} has neither {SINGLE} nor {INDEX}; found {found[:10]}.' + hint)
    self._handles = {}
    self.file_of: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{INDEX} in {hf_dir} names {name}, which is missing.')
      handle = safetensors.safe_open(path, framework='numpy')
      self._handles[name] = handle
      for key in handle.keys():
        self.file_of[key] = name
        self.shapes[key] = tuple(handle.get_slice(key).get_shape())

  def __getitem__(self, name: str) -> np.ndarray:
    return self._handles[self.file_of[name]].get_tensor(name)

  def __contains__(self, name: str) -> bool:
    return name in self.shapes

  def __iter__(self):
    return iter(self.shapes)


def load_params(hf_dir: str, cfg: ModelConfig | None = None, *,
                shardings: Mapping | None = None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params as a nested dict of jax.Arrays in cfg.param_dtype) from `hf_dir`.

  `cfg` defaults to the one config.json describes (pass one to choose scan_layers, dtypes, ...).
  `shardings`: a nested dict like the params (e.g. nnx.to_pure_dict of logical shardings); each
  parameter goes straight to its devices, only this process's shards of it.
  """
  cfg = cfg or hf.config_from_hf(read_config(hf_dir))
  reader = Reader(hf_dir)
  hf.check_tensors(cfg, reader.shapes, where=hf_dir)
  dtype = jax.numpy.dtype(cfg.param_dtype)
  out: dict = {}
  for key, specs in hf.leaf_specs(cfg).items():
    parts = [s.to_stoker(reader[s.name]).astype(dtype) for s in specs]
    host = hf.assemble(cfg, specs, parts)
    del parts
    sharding = hf.get_path(shardings, key) if shardings is not None else None
    hf.set_path(out, key, _place(host, sharding))
  return cfg, out


def _place(host: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jax.device_put(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def write(out_dir: str, cfg: ModelConfig, params: Mapping, *, base_config: Mapping | None = None,
          dtype: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
          files_from: Iterable[str] = ()) -> list[str]:
  """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`) into
  `out_dir`, tensor by tensor; copies TOKENIZER_FILES from the first directory in `files_from`
  that has each. Returns the files written. The directory appears whole or not at all."""
  dtype = dtype or (base_config or {}).get('dtype') or (base_config or {}).get('torch_dtype') or \
      'float32'
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(f'{out_dir} exists and is not empty; export into a new directory.')
  np_dtype = jax.numpy.dtype(dtype)
  tmp = out_dir.rstrip('/') + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  shards = _write_shards(tmp, ((n, x.astype(np_dtype)) for n, x in hf.params_to_hf(cfg, params)),
                         max_shard_bytes)
  with open(os.path.join(tmp, 'config.json'), 'w') as f:
    json.dump(hf.config_to_hf(cfg, base_config, dtype), f, indent=2, sort_keys=True)
  written = ['config.json', *shards]
  for name in TOKENIZER_FILES:
    source = next((os.path.join(d, name) for d in files_from
                   if os.path.isfile(os.path.join(d, name))), None)
    if source:
      shutil.copyfile(source, os.path.join(tmp, name))
      written.append(name)
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty (checked above)
  os.rename(tmp, out_dir)
  return written


def _write_shards(directory: str, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int) -> list[str]:
  """Shard files of at most max_shard_bytes (a larger tensor gets one of its own) + the index."""
  current, size, total = {}, 0, 0
  written: list[tuple[str, list[str]]] = []

  def flush():
    nonlocal current, size
    if current:
      name = f'part-{len(written)}.safetensors'
      safetensors.numpy.save_file(current, os.path.join(directory, name), metadata={'format': 'pt'})
      written.append((name, list(current)))
      current, size = {}, 0

  for name, x in tensors:
    x = np.ascontiguousarray(x)
    if current and size + x.nbytes > max_shard_bytes:
      flush()
    current[name] = x
    size += x.nbytes
    total += x.nbytes
  flush()
  if len(written) == 1:
    os.rename(os.path.join(directory, written[0][0]), os.path.join(directory, SINGLE))
    return [SINGLE]
  weight_map, names = {}, []
  for i, (tmp_name, keys) in enumerate(written):
    final = f'model-{i + 1:05d}-of-{len(written):05d}.safetensors'
    os.rename(os.path.join(directory, tmp_name), os.path.join(directory, final))
    weight_map.update({k: final for k in keys})
    names.append(final)
  with open(os.path.join(directory, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2,
              sort_keys=True)
  return names + [INDEX]


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the TOKENIZER_FILES `src_dir` has into `dst_dir` (created); returns their names."""
  os.makedirs(dst_dir, exist_ok=True)
  copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
  for name in copied:
    shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  return copied

