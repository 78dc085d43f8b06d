"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors) <-> Stoker adapters.

PEFT stores, for each adapted Linear of the Hugging Face model (`model.layers.3.self_attn.q_proj`),
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; Stoker's a [I..., r]
and b [r, O...] are the same numbers with the heads split out (models/hf.py's table gives every
weight's HF name and layout). A weight kind adapted in some layers only is read with zero factors in
the others, which adapt nothing. PEFT features with no Stoker counterpart (DoRA, biases, extra
trainable modules, per-module ranks, ...) are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

from models import hf, lora
from models.config import ModelConfig

CONFIG = 'adapter_config.json'
WEIGHTS = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'

# adapter_config.json fields that change the adapter's meaning when set (Stoker supports them unset).
_UNSUPPORTED = ('use_dora', 'fan_in_fan_out', 'bias', 'lora_bias', 'modules_to_save',
                'layer_replication', 'rank_pattern', 'alpha_pattern', 'target_parameters',
                'trainable_token_indices', 'use_qalora', 'use_bdlora', 'alora_invocation_tokens')


def _module(spec: hf.TensorSpec) -> str:
  return spec.name[:-len('.weight')]


def _specs(cfg: ModelConfig) -> dict[tuple, list[hf.TensorSpec]]:
  """Stoker weight path -> the HF Linear weights (one a layer) that make it, for adaptable weights."""
  return {k: v for k, v in hf.leaf_specs(cfg).items() if v[0].in_dims}


def write(out_dir: str, cfg: ModelConfig, adapters: nnx.State, config: lora.LoRAConfig,
          base_model: str | None = None) -> list[str]:
  """Writes a PEFT adapter directory for the Hugging Face export of `cfg`; returns the files."""
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(f'{out_dir} exists and is not empty; export into a new directory.')
  pairs = lora._pairs(adapters)  # pylint: disable=protected-access
  specs = _specs(cfg)
  tensors, modules, kinds = {}, [], {}
  for path, (a, b) in pairs.items():
    a, b = np.asarray(jax.device_get(a), np.float32), np.asarray(jax.device_get(b), np.float32)
    for s in specs[path]:
      la, lb = (a[s.layer], b[s.layer]) if s.layer is not None and cfg.scan_layers else (a, b)
      tensors[f'{PREFIX}{_module(s)}.lora_A.weight'] = np.ascontiguousarray(
          la.reshape(-1, config.rank).T)
      tensors[f'{PREFIX}{_module(s)}.lora_B.weight'] = np.ascontiguousarray(
          lb.reshape(config.rank, -1).T)
      modules.append(_module(s))
      kinds.setdefault(_module(s).rsplit('.', 1)[-1], []).append(_module(s))
  all_specs = [s for v in specs.values() for s in v]
  # Short names ('q_proj') where a kind is adapted in every layer, as PEFT users write them;
  # full module names otherwise (PEFT matches a name or a '.'-suffix of one).
  targets = []
  for kind, names in sorted(kinds.items()):
    everywhere = {_module(s) for s in all_specs if _module(s).endswith('.' + kind)}
    targets += [kind] if set(names) == everywhere else sorted(names)
  body = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': config.rank,
          'lora_alpha': config.alpha, 'lora_dropout': config.dropout, 'use_rslora': config.rslora,
          'target_modules': targets, 'bias': 'none', 'fan_in_fan_out': False,
          'init_lora_weights': True, 'inference_mode': True, 'modules_to_save': None,
          'base_model_name_or_path': base_model}
  tmp = out_dir.rstrip('/') + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(tmp, CONFIG), 'w') as f:
    json.dump(body, f, indent=2, sort_keys=True)
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)
  os.rename(tmp, out_dir)
  return [CONFIG, WEIGHTS]


def read_config(peft_dir: str) -> lora.LoRAConfig:
  """The LoRAConfig of a PEFT adapter directory (targets filled in by `read`)."""
  path = os.path.join(peft_dir, CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{peft_dir} has no {CONFIG}; expected a PEFT LoRA adapter directory '
                            f'({CONFIG} + {WEIGHTS}).')
  with open(path) as f:
    body = json.load(f)
  if body.get('peft_type') != 'LORA':
    raise ValueError(f'{path}: peft_type {body.get("peft_type")!r} is not supported; only LORA is.')
  bad = [f'{k}={body[k]!r}' for k in _UNSUPPORTED if body.get(k) not in (None, False, {}, [], 'none')]
  if bad:
    raise ValueError(f'{path}: {", ".join(bad)} is not supported by Stoker\'s LoRA (it supports '
                     'plain LoRA and rsLoRA on the Linear layers); merge the adapter with PEFT '
                     '(merge_and_unload) and convert the merged model instead.')
  return lora.LoRAConfig(base=body.get('base_model_name_or_path') or '', rank=int(body['r']),
                         alpha=float(body['lora_alpha']),
                         dropout=float(body.get('lora_dropout') or 0.0),
                         rslora=bool(body.get('use_rslora')))


def read(peft_dir: str, cfg: ModelConfig) -> tuple[nnx.State, lora.LoRAConfig]:
  """(adapters, LoRAConfig) from a PEFT directory made for the Hugging Face form of `cfg`.

  ValueError, naming the tensor, for an adapter of another base (unknown module, wrong shape)."""
  config = read_config(peft_dir)
  path = os.path.join(peft_dir, WEIGHTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{peft_dir} has no {WEIGHTS} (only safetensors adapters are read).')
  tensors = safetensors.numpy.load_file(path)
  by_module = {}
  for name, x in tensors.items():
    m = re.fullmatch(r'(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight', name)
    if not m:
      raise ValueError(f'{path}: tensor {name!r} is not a LoRA factor (lora_A/lora_B).')
    by_module.setdefault(m.group(1), {})[m.group(2)] = x
  specs = _specs(cfg)
  where = {_module(s): (key, s) for key, v in specs.items() for s in v}
  unknown = sorted(set(by_module) - set(where))
  if unknown:
    raise ValueError(f'{peft_dir} adapts modules the base does not have: {", ".join(unknown[:4])}; '
                     f'it was made for another model (this one has {cfg.num_layers} layers).')
  r = config.rank
  chosen = sorted({where[m][0] for m in by_module})
  targets = '^(' + '|'.join(re.escape('/'.join(map(str, k))) for k in chosen) + ')$'
  config = dataclasses.replace(config, targets=targets)
  abstract = jax.eval_shape(lambda: nnx.state(_model(cfg)))
  adapters = lora.init_adapters(cfg, abstract, config, jax.random.key(0))
  values = {p: np.zeros(v.shape, np.float32) for p, v in nnx.to_flat_state(adapters)}
  for module, factors in by_module.items():
    key, s = where[module]
    if set(factors) != {'A', 'B'}:
      raise ValueError(f'{path}: {module} has lora_{"".join(factors)} but not both factors.')
    a_shape = values[key + ('lora_a',)].shape[s.layer is not None and cfg.scan_layers:]
    b_shape = values[key + ('lora_b',)].shape[s.layer is not None and cfg.scan_layers:]
    want_a, want_b = (r, int(np.prod(a_shape[:-1]))), (int(np.prod(b_shape[1:])), r)
    for f, want in (('A', want_a), ('B', want_b)):
      if factors[f].shape != want:
        raise ValueError(f'{path}: {module}.lora_{f} has shape {factors[f].shape}, expected {want} '
                         f'(rank {r}, this base\'s layout); the adapter belongs to another base.')
    a, b = factors['A'].T.reshape(a_shape), factors['B'].T.reshape(b_shape)
    for name, x in (('lora_a', a), ('lora_b', b)):
      if s.layer is not None and cfg.scan_layers:
        values[key + (name,)][s.layer] = x
      else:
        values[key + (name,)][...] = x
  flat = [(p, v.replace(jax.numpy.asarray(values[p], v.dtype))) for p, v in nnx.to_flat_state(adapters)]
  return nnx.from_flat_state(flat), config


def _model(cfg: ModelConfig):
  from models import transformer  # pylint: disable=import-outside-toplevel
  return transformer.Transformer(cfg, nnx.Rngs(0))
