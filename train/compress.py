"""`stoker prune`: a trained model in, a smaller step-0 training workdir out.

    stoker prune --checkpoint W | --hf-dir D --out W2 [--mlp-keep 0.5] [--heads-keep 0.5]
                 [--layers-keep 0.75] [--embed-keep 1.0] [--calibration DATA_DIR]
                 [--calibration-batches 8]

Importance comes from the first `calibration_batches` batches of a validation split: the one the
checkpoint trained on unless `--calibration` names a `stoker prepare` directory (an HF model has none
of its own). train/prune.py ranks and cuts; this module reads the source and writes W2 exactly as
`stoker convert --from-hf` writes a workdir (train/from_hf.py): the TrainState of step 0 (pruned
params, fresh optimizer state) and the data iterator's initial state in W2/checkpoints/0, plus
  W2/train.gin     the source's training recipe with the pruned model bound (train: `stoker train
                   --gin_file W2/train.gin --workdir W2`; distil: `stoker distill --teacher W
                   --student W2`);
  W2/hf/           the tokenizer files (and an HF source's config.json, for `stoker convert --to-hf`);
  W2/prune.json    the command, the sizes before and after, the units removed and every score.
Everything is checked before anything is written; a failure leaves no W2. The source and the
calibration forward passes live on one device (fine for the models this machine trains; a model
larger than one device's memory needs them sharded, which is not written yet); W2 is written onto the
recipe's mesh. An HF source trains on with TrainConfig's defaults and the calibration set as its data.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import checkpoint as model_checkpoint
from models import checkpoint_io, hf, hf_files
from models.config import ModelConfig
from parallelism.mesh import MeshConfig, make_mesh
from train import datasets, from_hf, prune
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, TrainConfig

_SECTIONS = {'mesh': MeshConfig, 'optimizer': OptimizerConfig, 'data': DataConfig,
             'checkpoint': CheckpointConfig}


def saved_train_config(saved: dict) -> TrainConfig:
  """The TrainConfig a checkpoint recorded; fault injection, distillation and other training modes
  are reset to off."""
  fields = saved['train']
  sections = {k: cls(**fields[k]) for k, cls in _SECTIONS.items() if k in fields}
  return TrainConfig(model=model_checkpoint.model_config(saved), **sections,
                     **{k: fields[k] for k in _scalars() if k in fields})


def _scalars() -> list[str]:
  """TrainConfig's plain fields (steps, batch_size, ...); its other sections keep their defaults."""
  return [f.name for f in dataclasses.fields(TrainConfig)
          if isinstance(f.default, (int, float, str, bool)) and f.name not in _SECTIONS]


def train_gin(cfg: TrainConfig, header: str) -> str:
  """A gin file binding the model, mesh, optimizer, data, checkpoints and plain fields of `cfg`."""
  lines = [f'# {line}' for line in header.splitlines()] + [
      'import train.from_hf  # registers rope_scaling', '',
      'train.model = @model()', "model.name = 'tiny'  # every field is bound below"]

  def bind(section: str, value) -> list[str]:
    out = []
    for f in dataclasses.fields(value):
      v = getattr(value, f.name)
      if f.name == 'rope_scaling' and v is not None:
        out.append(f'{section}.rope_scaling = @rope_scaling()')
        out += [f'rope_scaling.{k} = {x!r}' for k, x in dataclasses.asdict(v).items()]
      else:
        out.append(f'{section}.{f.name} = {getattr(v, "value", v)!r}')
    return out

  lines += bind('model', cfg.model)
  for name in _SECTIONS:
    lines += ['', f'train.{name} = @{name}()'] + bind(name, getattr(cfg, name))
  lines.append('')
  lines += [f'train.{name} = {getattr(cfg, name)!r}' for name in _scalars()]
  return '\n'.join(lines) + '\n'


def _source(checkpoint: str | None, hf_dir: str | None, calibration: str | None):
  """(TrainConfig to continue with, calibration data directory, tokenizer directory or None)."""
  if bool(checkpoint) == bool(hf_dir):
    raise ValueError('give exactly one of --checkpoint WORKDIR or --hf-dir DIR.')
  if hf_dir:
    if not calibration:
      raise ValueError(f'--hf-dir {hf_dir}: a Hugging Face model has no validation split of its '
                       'own; give --calibration DATA_DIR (a `stoker prepare` directory made with '
                       "the model's tokenizer).")
    model = hf.config_from_hf(hf_files.read_config(hf_dir))
    cfg = TrainConfig(model=model, data=DataConfig(source=os.path.abspath(calibration)))
    return cfg, calibration, hf_dir
  saved = model_checkpoint.saved_config(model_checkpoint.step_dir(checkpoint))
  cfg = saved_train_config(saved)
  if calibration is None:
    calibration = datasets.data_dir(cfg) if cfg.data.source != 'synthetic' else None
    if calibration is None:
      raise ValueError(f'--checkpoint {checkpoint} trained on synthetic data, which has no '
                       'validation split to rank units on; give --calibration DATA_DIR (a '
                       '`stoker prepare` directory).')
  sidecar = os.path.join(checkpoint, checkpoint_io.HF_SUBDIR)
  return cfg, calibration, sidecar if os.path.isdir(sidecar) else None


def _calibration_batches(cfg: TrainConfig, directory: str, n: int) -> list[dict]:
  if not os.path.isfile(os.path.join(directory, 'manifest.json')):
    raise FileNotFoundError(f'calibration set {directory!r} has no manifest.json; give a '
                            '`stoker prepare` directory (--calibration DATA_DIR).')
  from data import prepare  # pylint: disable=g-import-not-at-top
  prepare.check_vocab(directory, cfg.model.vocab_size)
  with datasets.validation_batches(cfg, directory) as val:
    batches = [{k: np.asarray(v) for k, v in b.items()} for b in itertools.islice(val, n)]
  if not batches:
    raise ValueError(f'calibration set {directory!r} has an empty validation split; prepare it '
                     'with --validation-fraction > 0.')
  return batches


def prune_checkpoint(out: str, fractions: prune.KeepFractions, *, checkpoint: str | None = None,
                     hf_dir: str | None = None, calibration: str | None = None,
                     calibration_batches: int = 8, command: Sequence[str] = ()) -> dict:
  """Writes the pruned step-0 workdir `out` (see the module docstring); returns prune.json."""
  if os.path.exists(out):
    raise ValueError(f'--out {out} exists; prune into a new directory (nothing was written).')
  if calibration_batches < 1:
    raise ValueError(f'--calibration-batches {calibration_batches}: give at least 1.')
  cfg, calibration, tokenizer_dir = _source(checkpoint, hf_dir, calibration)
  mesh = make_mesh(cfg.mesh)
  sizes = prune.choose_sizes(cfg.model, fractions, dict(mesh.shape))
  batches = _calibration_batches(cfg, calibration, calibration_batches)
  model_cfg, params = checkpoint_io.load(checkpoint or hf_dir)
  params = prune.stack_layers(jax.tree.map(np.asarray, nnx.to_pure_dict(params)))
  stats = prune.activation_stats(model_cfg, params, batches)
  keep = prune.select(stats, sizes)
  new_model = dataclasses.replace(prune.pruned_config(model_cfg, keep),
                                  scan_layers=cfg.model.scan_layers)
  new_params = prune.unstack_layers(prune.slice_params(model_cfg, params, keep),
                                    new_model.scan_layers)
  new_cfg = dataclasses.replace(cfg, model=new_model)
  record = _record(model_cfg, new_model, keep, stats, command, checkpoint or hf_dir, calibration)
  text = train_gin(new_cfg, f'Written by `stoker prune` from {checkpoint or hf_dir} (prune.json '
                   'says what was removed).\nTrain: stoker train --gin_file <this file> --workdir '
                   '<its directory>\nDistil: stoker distill --teacher <the source> --student <its '
                   'directory>')
  try:
    _write_workdir(out, new_cfg, new_params, text, mesh)
    sidecar = os.path.join(out, checkpoint_io.HF_SUBDIR)
    os.makedirs(sidecar, exist_ok=True)
    if hf_dir:
      shutil.copyfile(os.path.join(hf_dir, 'config.json'), os.path.join(sidecar, 'config.json'))
    hf_files.copy_tokenizer_files(tokenizer_dir or calibration, sidecar)
    with open(os.path.join(out, 'prune.json'), 'w') as f:
      json.dump(record, f, indent=1)
  except BaseException:
    shutil.rmtree(out, ignore_errors=True)
    raise
  return record


def _write_workdir(out: str, cfg: TrainConfig, params: dict, text: str, mesh) -> None:
  """TrainState of step 0 with `params` (host arrays), placed on `mesh`, saved with the data state."""
  dtype = jnp.dtype(cfg.model.param_dtype)

  def place(shardings):
    return jax.tree.map(lambda host, s: jax.make_array_from_callback(
        host.shape, s, lambda i, h=host.astype(dtype): h[i]), params, nnx.to_pure_dict(shardings))

  from_hf.write_step0(out, cfg, place, text, mesh)


def _record(before: ModelConfig, after: ModelConfig, keep: prune.Keep, stats: dict,
            command: Sequence[str], source: str, calibration: str) -> dict:
  """prune.json: what was kept and removed, the scores it was decided on, and how to redo it."""
  def removed(total: int, kept) -> list[int]:
    return sorted(set(range(total)) - {int(i) for i in kept})

  sizes = ('num_layers', 'num_heads', 'num_kv_heads', 'mlp_dim', 'd_model')
  return {
      'command': ' '.join(['stoker', *command]) if command else None,
      'source': os.path.abspath(source), 'calibration': os.path.abspath(calibration),
      'calibration_tokens': stats['tokens'],
      'sizes': {k: [getattr(before, k), getattr(after, k)] for k in sizes},
      'params': [before.num_params(), after.num_params()],
      'layer_criterion': 'block importance: 1 - cos(block input, block output)',
      'removed': {
          'layers': removed(before.num_layers, keep.layers),
          'kv_groups': {int(i): removed(before.num_kv_heads, g) for i, g in zip(keep.layers, keep.groups)},
          'mlp_neurons': {int(i): removed(before.mlp_dim, n) for i, n in zip(keep.layers, keep.neurons)},
          'embed_channels': removed(before.d_model, keep.channels)},
      'scores': {k: np.round(v, 6).tolist() for k, v in stats.items() if k != 'tokens'},
  }


def describe(record: dict) -> str:
  """One line per size, for the command's output."""
  lines = [f'  {k:<13} {a:>8} -> {b}' for k, (a, b) in record['sizes'].items()]
  a, b = record['params']
  return '\n'.join(lines + [f'  {"parameters":<13} {a:>8,} -> {b:,} ({b / a:.1%})'])


def add_arguments(p) -> None:
  """`stoker prune`'s flags."""
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument('--checkpoint', help='A training workdir (its newest checkpoint) to prune.')
  source.add_argument('--hf-dir', '--hf_dir', dest='hf_dir', help='A Hugging Face model directory.')
  p.add_argument('--out', required=True, help='The step-0 workdir to write (must not exist).')
  for name, default, what in (('mlp', 0.5, 'MLP neurons'), ('heads', 0.5, 'GQA groups (a key/value '
                              'head with its query heads)'), ('layers', 0.75, 'layers'),
                              ('embed', 1.0, 'embedding channels')):
    p.add_argument(f'--{name}-keep', f'--{name}_keep', dest=f'{name}_keep', type=float,
                   default=default, help=f'Share of {what} to keep, in (0, 1] (default {default}).')
  p.add_argument('--calibration', default=None,
                 help='A `stoker prepare` directory whose validation split ranks the units (default: '
                      'the one the checkpoint trained on; required with --hf-dir).')
  p.add_argument('--calibration-batches', '--calibration_batches', dest='calibration_batches',
                 type=int, default=8, help='Validation batches (of the recipe\'s shape) to rank on.')


def command(args, argv: Sequence[str]) -> int:
  """Runs `stoker prune` from its parsed flags; prints the chosen sizes and what to run next."""
  fractions = prune.KeepFractions(**{k: getattr(args, k) for k in prune.FRACTIONS})
  record = prune_checkpoint(args.out, fractions, checkpoint=args.checkpoint, hf_dir=args.hf_dir,
                            calibration=args.calibration,
                            calibration_batches=args.calibration_batches, command=argv)
  source = args.checkpoint or args.hf_dir
  print(f'Pruned {source} into {args.out} (step 0):\n{describe(record)}\n'
        f'What was removed: {os.path.join(args.out, "prune.json")}. Distil: stoker distill --teacher '
        f'{source} --student {args.out}; train: stoker train --gin_file '
        f'{os.path.join(args.out, "train.gin")} --workdir {args.out}')
  return 0
