"""What `stoker serve` serves: a model (from a training checkpoint or a Hugging Face directory) in an
Engine, with its tokenizer and chat template.

A training checkpoint records its ModelConfig and the data it trained on; the tokenizer is the one
that data was prepared with (<data dir>/tokenizer.json; for data.source='stdlib' the prepared
cache <cache_dir>/stdlib-v<vocab>), unless `tokenizer` names another. Params are restored straight
onto the serving mesh's shardings (models/checkpoint.py reads only the params).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

import storage
from models import checkpoint as model_checkpoint
from models import checkpoint_io, peft_files, transformer
from models import lora as lora_lib
from models.config import ModelConfig
from parallelism import sharding as sharding_lib
from parallelism.mesh import MeshConfig, make_mesh
from data.chat import ChatTemplate, load_template
from serve.engine import Engine, EngineConfig
from serve.text import Codec

# `loras`: (name, path) pairs served beside the base (serve/lora.py); see read_adapter.


@dataclasses.dataclass
class Loaded:
  """A model ready to serve."""

  name: str
  engine: Engine
  codec: Codec
  chat: ChatTemplate
  source: str  # where it came from, for logs


def serving_mesh(tensor_parallel: int = 1) -> Mesh | None:
  """None (one device) for 1; else a ('data', 'fsdp', 'tensor') mesh of the first N devices."""
  if tensor_parallel < 1 or tensor_parallel > len(jax.devices()):
    raise ValueError(f'--tensor_parallel {tensor_parallel}: use 1 to {len(jax.devices())} (the '
                     f'devices here).')
  if tensor_parallel == 1:
    return None
  return make_mesh(MeshConfig(ici=(1, 1, tensor_parallel)), jax.devices()[:tensor_parallel])


def shardings(abstract, mesh: Mesh | None):
  """Where each param is served: the first device, or the mesh by the logical-axis rules."""
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, abstract)
  return sharding_lib.logical_shardings(abstract, mesh)


def abstract_params(cfg: ModelConfig, mesh: Mesh | None):
  """The model's params as ShapeDtypeStructs carrying the shardings they are served with."""
  _, state = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      shardings(state, mesh))


def _special_tokens(tokenizer_dir: str | None) -> tuple[str | None, str | None]:
  """(bos, eos) token text from tokenizer_config.json, if it names them."""
  path = os.path.join(tokenizer_dir or '', 'tokenizer_config.json')
  if not tokenizer_dir or not os.path.isfile(path):
    return None, None
  with open(path) as f:
    cfg = json.load(f)

  def text(v):
    return v.get('content') if isinstance(v, dict) else v
  return text(cfg.get('bos_token')), text(cfg.get('eos_token'))


def _local_tokenizer(tokenizer: str) -> str:
  """`tokenizer` (a tokenizer.json or a directory holding one), with a bucket's copied to the local cache:
  tokenizer.json and tokenizer_config.json only (a data directory's shards stay where they are)."""
  if not storage.is_bucket(tokenizer):
    return tokenizer
  is_dir = storage.isdir(tokenizer)
  directory = tokenizer if is_dir else storage.dirname(tokenizer)
  names = ['tokenizer.json' if is_dir else storage.basename(tokenizer), 'tokenizer_config.json']
  for name in names:
    if storage.isfile(storage.join(directory, name)):
      storage.get_file(storage.join(directory, name), os.path.join(storage.local_mirror(directory), name))
  local = storage.local_mirror(directory)
  return local if is_dir else os.path.join(local, names[0])


def _codec_and_chat(tokenizer: str, model_cfg: ModelConfig) -> tuple[Codec, ChatTemplate]:
  tokenizer = _local_tokenizer(tokenizer)
  directory = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(tokenizer)
  bos, eos = _special_tokens(directory)
  codec = Codec.from_file(tokenizer, eos_token=eos)
  codec = dataclasses.replace(codec, bos_token=bos)
  if codec.vocab_size > model_cfg.vocab_size:
    raise ValueError(f'tokenizer {tokenizer} has ids up to {codec.vocab_size - 1}, beyond the '
                     f"model's vocab_size {model_cfg.vocab_size}; give the tokenizer it was trained with.")
  return codec, ChatTemplate(load_template(directory), bos, codec.eos_token)


def training_tokenizer(saved: dict, model_cfg: ModelConfig) -> str | None:
  """The tokenizer.json of the data a checkpoint was trained on, if it can be found."""
  data = (saved.get('train') or {}).get('data') or {}
  source = data.get('source', 'synthetic')
  if source == 'synthetic':
    return None
  if source == 'stdlib':
    source = os.path.join(os.path.expanduser(data.get('cache_dir', '~/.cache/stoker/data')),
                          f'stdlib-v{model_cfg.vocab_size}')
  path = storage.join(source, 'tokenizer.json')
  return path if storage.isfile(path) else None


_ARCHITECTURE = ('num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
                 'vocab_size', 'scan_layers')


def read_adapter(path: str, cfg: ModelConfig) -> tuple[nnx.State, lora_lib.LoRAConfig]:
  """(adapters, LoRAConfig) of a PEFT adapter directory or a LoRA run's workdir, for the served
  model `cfg`. ValueError (FileNotFoundError for no adapter there), naming the problem, for an
  adapter of another base."""
  if storage.isfile(storage.join(path, peft_files.CONFIG)):
    return peft_files.read(storage.local_copy(path), cfg)  # a bucket's adapter files are downloaded once
  if not storage.isdir(path):
    raise FileNotFoundError(f'LoRA adapter {path!r}: no such directory; give a PEFT adapter '
                            'directory or a LoRA training run\'s workdir.')
  directory = model_checkpoint.step_dir(path)
  config = checkpoint_io.lora_config(directory)
  if config is None:
    raise ValueError(f'{path} is neither a PEFT adapter directory ({peft_files.CONFIG}) nor a '
                     'LoRA training run (train config with lora.base set).')
  run_cfg = model_checkpoint.model_config(model_checkpoint.saved_config(directory))
  wrong = [f'{k} {getattr(run_cfg, k)} (served: {getattr(cfg, k)})' for k in _ARCHITECTURE
           if getattr(run_cfg, k) != getattr(cfg, k)]
  if wrong:
    raise ValueError(f'LoRA run {path} adapts another base ({config.base}): {", ".join(wrong)}.')
  return checkpoint_io.restore_adapters(directory, run_cfg, config), config


def check_adapters(loras, model_name: str | None = None) -> None:
  """Fails now, naming the problem, for a --lora whose directory is missing or whose name repeats
  (or is the base's), before a port is bound; the adapter files are read when the model loads."""
  names = [name for name, _ in loras]
  for name, path in loras:
    if names.count(name) > 1 or name == model_name:
      raise ValueError(f'--lora {name}={path}: the name {name!r} is taken'
                       f'{" by the base" if name == model_name else " twice"}; give each its own.')
    if not storage.isdir(path):
      raise FileNotFoundError(f'--lora {name}={path}: no such directory; give a PEFT adapter '
                              "directory or a LoRA training run's workdir.")


def add_adapters(engine: Engine, loras) -> None:
  """Registers (name, path) adapters in `engine` (whose EngineConfig has max_loras > 0)."""
  for name, path in loras:
    adapters, config = read_adapter(path, engine.model_cfg)
    engine.adapters.register(name, adapters, config, source=path)
    logging.info('LoRA adapter %r (rank %d) from %s', name, config.rank, path)


def load_checkpoint(path: str, engine_cfg: EngineConfig, *, step: int | None = None,
                    mesh: Mesh | None = None, tokenizer: str | None = None,
                    name: str | None = None, loras=()) -> Loaded:
  """Serves the newest (or `step`) checkpoint of a training workdir."""
  directory = model_checkpoint.step_dir(path, step)
  saved = model_checkpoint.saved_config(directory)
  model_cfg = model_checkpoint.model_config(saved)
  tokenizer = tokenizer or training_tokenizer(saved, model_cfg)
  if tokenizer is None:
    raise FileNotFoundError(f'{directory} was trained on data without a tokenizer (synthetic, or '
                            f'its data directory is gone); pass --tokenizer PATH/tokenizer.json.')
  codec, chat = _codec_and_chat(tokenizer, model_cfg)
  # Through checkpoint_io, which also reads a LoRA run's workdir (its base with the adapters merged).
  _, params = checkpoint_io.read_params(directory, shardings_for=lambda a: shardings(a, mesh))
  logging.info('Restored %s params (%d layers, width %d, vocabulary %d) from %s',
               f'{model_cfg.num_params():,}', model_cfg.num_layers, model_cfg.d_model,
               model_cfg.vocab_size, directory)
  engine = Engine(model_cfg, params, engine_cfg, mesh, detokenize=codec.decode)
  add_adapters(engine, loras)
  if name is None:
    workdir = storage.dirname(storage.dirname(directory))
    name = storage.basename(workdir if storage.basename(storage.dirname(directory)) == 'checkpoints'
                            else storage.dirname(directory))
  return Loaded(name, engine, codec, chat, directory)


def check_source(checkpoint: str | None = None, hf_dir: str | None = None,
                 step: int | None = None) -> None:
  """Fails now, naming the problem, if the model to serve is not there (before a port is bound)."""
  if checkpoint is not None:
    model_checkpoint.step_dir(checkpoint, step)
  elif not storage.isfile(storage.join(hf_dir, 'config.json')):
    raise FileNotFoundError(f'--hf-dir {hf_dir!r} has no config.json; give a Hugging Face model '
                            'directory (config.json, *.safetensors, tokenizer.json).')


def load_hf(directory: str, engine_cfg: EngineConfig, *, mesh: Mesh | None = None,
            tokenizer: str | None = None, name: str | None = None, loras=()) -> Loaded:
  """Serves a Hugging Face model directory (config.json, *.safetensors, tokenizer.json); each tensor
  is read and placed on its serving devices in turn (models/checkpoint_io.py)."""
  check_source(hf_dir=directory)
  model_cfg, params = checkpoint_io.load(directory, shardings_for=lambda a: shardings(a, mesh))
  codec, chat = _codec_and_chat(tokenizer or directory, model_cfg)
  engine = Engine(model_cfg, params, engine_cfg, mesh, detokenize=codec.decode)
  add_adapters(engine, loras)
  return Loaded(name or storage.basename(storage.absolute(directory)), engine, codec, chat, directory)
