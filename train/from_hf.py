"""Fine-tuning from Hugging Face: a training workdir at step 0 holding a Hugging Face model's weights.

`stoker convert --from-hf DIR --out WORKDIR [--gin_file ...]` writes exactly what `stoker train` would
have saved before its first step with that recipe, except that the parameters are the Hugging Face
ones: the TrainState (step 0, params, freshly initialised optimizer state) placed on the recipe's
mesh, the data iterator's initial state, the config; plus
  WORKDIR/train.gin  the recipe with the model's architecture bound (`stoker train --gin_file
                     WORKDIR/train.gin --workdir WORKDIR` resumes from step 0, i.e. fine-tunes);
  WORKDIR/hf/        the original config.json and tokenizer/chat-template files (for serving and
                     for `stoker convert --to-hf`).
Architecture fields come from config.json; execution fields (scan_layers, remat, attention, dtypes)
from the recipe's model. Parameters are read tensor by tensor straight onto the mesh.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

import storage
from models import checkpoint_io, hf, hf_files, peft_files
from models.config import ModelConfig, RopeScaling
from parallelism import sharding
from parallelism.mesh import make_mesh
from train import datasets
from train.checkpoint import Checkpoints, checkpoint_dir
from train.config import TrainConfig
from train.optimizer import make_optimizer
from train.step import TrainState, fresh_state

# The model's architecture: what config.json decides. The other ModelConfig fields are the recipe's.
ARCHITECTURE = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                'mlp_dim', 'rope_theta', 'rope_scaling', 'rms_eps', 'tie_embeddings', 'qkv_bias',
                'qk_norm')

# train.gin binds RopeScaling by this name; the file imports this module, which registers it.
gin.external_configurable(RopeScaling, 'rope_scaling')


def add_arguments(p: argparse.ArgumentParser) -> None:
  """`stoker convert`'s flags (--to-hf runs models/checkpoint_io.py: to_hf)."""
  p.add_argument('--from-hf', '--from_hf', dest='from_hf', default=None,
                 help='A Hugging Face model directory (config.json, *.safetensors; Llama, Mistral, Qwen2, Qwen3).')
  p.add_argument('--to-hf', '--to_hf', dest='to_hf', default=None,
                 help='A training workdir (its newest checkpoint), its checkpoints/ or a step folder.')
  p.add_argument('--out', required=True, help='The workdir (--from-hf) or directory (--to-hf) to write.')
  p.add_argument('--gin_file', action='append', default=[],
                 help='--from-hf: the training recipe to fine-tune with (default: train/tiny_cpu.gin on '
                      'synthetic data); its model fields other than the architecture (dtypes, remat, scan) apply.')
  p.add_argument('--gin_param', action='append', default=[], help='--from-hf: recipe bindings.')
  p.add_argument('--step', type=int, default=None, help='--to-hf: the step (default: the newest).')
  p.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                 help="--to-hf: tensor dtype (default: the original config's, else float32).")
  p.add_argument('--tokenizer', default=None, help='--to-hf: a directory whose tokenizer/chat-template files '
                 'to include (default: WORKDIR/hf, kept by --from-hf).')
  p.add_argument('--max_shard_mb', type=float, default=5120,
                 help='--to-hf: largest safetensors file before sharding with an index (MiB).')
  p.add_argument('--merge-lora', '--merge_lora', dest='merge_lora', action='store_true',
                 help='--to-hf of a LoRA run: export the base with the adapters merged in.')
  p.add_argument('--to-peft', '--to_peft', dest='to_peft', default=None,
                 help="A LoRA run's workdir: write its adapters as a PEFT adapter directory.")
  p.add_argument('--from-peft', '--from_peft', dest='from_peft', default=None,
                 help='A PEFT LoRA adapter directory: write a step-0 LoRA workdir over --base.')
  p.add_argument('--base', default=None,
                 help='--from-peft: the model the adapter adapts (a Hugging Face directory or a workdir).')


def model_config(hf_dir: str, recipe: ModelConfig | None) -> ModelConfig:
  """The architecture of `hf_dir` with the execution fields of `recipe` (if any)."""
  converted = hf.config_from_hf(hf_files.read_config(hf_dir))
  if recipe is None:
    return converted
  return dataclasses.replace(recipe, **{k: getattr(converted, k) for k in ARCHITECTURE})


def from_hf(hf_dir: str, workdir: str, cfg: TrainConfig, recipe_files: Sequence[str] = (),
            recipe_params: Sequence[str] = ()) -> TrainConfig:
  """Writes the step-0 workdir (see the module docstring); returns the TrainConfig it holds.

  `cfg` is the recipe's TrainConfig (its model is replaced by the converted one);
  `recipe_files` (resolved paths) / `recipe_params` are the gin files and bindings it came from,
  for train.gin.
  """
  _check_new(workdir)
  hf_dir = storage.local_copy(hf_dir)  # a bucket HF directory is downloaded once (safetensors reads local files)
  cfg = dataclasses.replace(cfg, model=model_config(hf_dir, cfg.model))
  write_step0(workdir, cfg, lambda shardings: hf_files.load_params(
      hf_dir, cfg.model, shardings=nnx.to_pure_dict(shardings))[1],
      train_gin(cfg.model, recipe_files, recipe_params))
  sidecar = os.path.join(workdir, checkpoint_io.HF_SUBDIR)
  os.makedirs(sidecar, exist_ok=True)
  with open(os.path.join(hf_dir, 'config.json')) as src, \
       open(os.path.join(sidecar, 'config.json'), 'w') as dst:
    dst.write(src.read())
  hf_files.copy_tokenizer_files(hf_dir, sidecar)
  return cfg


def from_peft(peft_dir: str, base: str, workdir: str, cfg: TrainConfig,
              recipe_files: Sequence[str] = (), recipe_params: Sequence[str] = ()) -> TrainConfig:
  """A step-0 LoRA workdir (train/finetune.py) whose adapters are a PEFT adapter's, over `base` (a
  Hugging Face directory or a workdir): `stoker train` fine-tunes it on, serving merges it."""
  _check_new(workdir)
  base_cfg = checkpoint_io.read_config(base)
  model = dataclasses.replace(cfg.model, **{k: getattr(base_cfg, k) for k in ARCHITECTURE})
  adapters, config = peft_files.read(peft_dir, model)
  cfg = dataclasses.replace(cfg, model=model,
                            lora=dataclasses.replace(config, base=os.path.abspath(base)))

  def params(shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), nnx.to_pure_dict(adapters),
                        nnx.to_pure_dict(shardings))

  text = train_gin(cfg.model, recipe_files, recipe_params)
  text += ''.join(f'lora.{f.name} = {getattr(cfg.lora, f.name)!r}\n'
                  for f in dataclasses.fields(cfg.lora))
  write_step0(workdir, cfg, params, text)
  return cfg


def _check_new(workdir: str) -> None:
  if storage.is_bucket(workdir):  # its train.gin must be a local file: gin reads no buckets
    raise ValueError(f'--out {workdir}: stoker convert writes a local workdir (train.gin is read by gin, which '
                     'reads local files only); convert into a local directory, then copy it to the bucket '
                     f'(gcloud storage cp -r DIR {workdir}, or aws s3 cp --recursive DIR {workdir}).')
  if os.path.isdir(checkpoint_dir(workdir)) and os.listdir(checkpoint_dir(workdir)):
    raise ValueError(f'{workdir} already holds checkpoints; convert into a new workdir.')


def write_step0(workdir: str, cfg: TrainConfig, load_params, text: str, mesh=None) -> None:
  """Saves the TrainState of step 0 with the params `load_params(shardings)` gives (a nested dict
  of arrays placed on those shardings), a fresh optimizer state, the data iterator's initial
  state and train.gin. `mesh` defaults to the recipe's."""
  mesh = mesh or make_mesh(cfg.mesh)
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  abstract = jax.eval_shape(functools.partial(fresh_state, cfg, tx))
  shardings = sharding.logical_shardings(abstract, mesh)
  state_params = jax.tree.map(lambda x: x, abstract.params)
  nnx.replace_by_pure_dict(state_params, load_params(shardings.params))
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(state_params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  state = TrainState(step, state_params, opt_state)

  data = datasets.train_batches(cfg, datasets.data_dir(cfg))
  try:
    data_state = data.get_state()
  finally:
    if hasattr(data, 'close'):
      data.close()
  ckpts = Checkpoints(workdir, cfg.checkpoint, cfg, text)
  try:
    ckpts.save(0, state, data_state, wait=True)
  finally:
    ckpts.close()
  with open(os.path.join(workdir, 'train.gin'), 'w') as f:
    f.write(text)


def from_hf_command(hf_dir: str, workdir: str, cfg: TrainConfig, recipe_files: Sequence[str] = (),
                    recipe_params: Sequence[str] = ()) -> int:
  """`stoker convert --from-hf`: from_hf, then how to fine-tune, serve or export the workdir."""
  cfg = from_hf(hf_dir, workdir, cfg, recipe_files, recipe_params)
  print(f'Converted {hf_dir} ({cfg.model.num_params():,} parameters) into {workdir} '
        f'(step 0). Fine-tune: stoker train --gin_file {os.path.join(workdir, "train.gin")} '
        f'--workdir {workdir}; export: stoker convert --to-hf {workdir} --out DIR')
  return 0


def from_peft_command(peft_dir: str, base: str | None, workdir: str, cfg: TrainConfig,
                      recipe_files: Sequence[str] = (), recipe_params: Sequence[str] = ()) -> int:
  """`stoker convert --from-peft DIR --base MODEL`: from_peft, then how to go on."""
  if not base:
    raise ValueError('--from-peft needs --base: the Hugging Face directory or workdir the adapter adapts.')
  from_peft(peft_dir, base, workdir, cfg, recipe_files, recipe_params)
  print(f'Wrote {workdir}: a step-0 LoRA workdir over {base}. Fine-tune: stoker train --gin_file '
        f'{os.path.join(workdir, "train.gin")} --workdir {workdir}; serve: stoker serve --checkpoint '
        f'{workdir}; export: stoker convert --to-hf {workdir} --merge-lora --out DIR')
  return 0


def train_gin(model: ModelConfig, recipe_files: Sequence[str], recipe_params: Sequence[str]) -> str:
  """A gin file: the recipe, then every ModelConfig field of `model` bound explicitly."""
  lines = ['# Written by `stoker convert --from-hf`: the recipe it was given, with the converted',
           "# model's architecture. Fine-tune with", '#   stoker train --gin_file <this file> '
           '--workdir <its directory>', f'import {__name__}', '']
  lines += [f"include '{os.path.abspath(f)}'" for f in recipe_files]
  lines += list(recipe_params)
  lines += ['', 'train.model = @model()', "model.name = 'tiny'  # every field is bound below"]
  for field in dataclasses.fields(model):
    value = getattr(model, field.name)
    if field.name == 'rope_scaling' and value is not None:
      lines.append('model.rope_scaling = @rope_scaling()')
      lines += [f'rope_scaling.{k} = {v!r}' for k, v in dataclasses.asdict(value).items()]
    else:
      value = value.value if hasattr(value, 'value') else value  # enums as their strings
      lines.append(f'model.{field.name} = {value!r}')
  return '\n'.join(lines) + '\n'
