"""LoRA fine-tuning in the train step: a frozen base and trainable adapters (models/lora.py).

With `lora.base` set, TrainState.params holds the adapters alone, so the optimizer state, the
gradients and the checkpoints hold only theirs. The base (a Stoker workdir or a Hugging Face
directory) is restored onto the mesh once, by the same logical-axis rules, and passed to the
compiled steps as an argument: never donated and never differentiated, so no gradient of a base
weight is ever formed. The saved config names the base, so serving, export and `stoker train`
read a LoRA workdir as the merged model (models/checkpoint_io.py).

QLoRA (`lora.base_dtype='int8'`): the base's decoder matrices are quantized on device after the
restore (models/quant.py, per output channel) and held as int8, a quarter of float32's bytes; their
products widen the weight on the fly in the compute dtype, so gradients flow through them to the
adapters of earlier layers exactly as over a float base that equals the int8 one. A merged
export folds the adapters into that dequantized base.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
from flax import nnx
from jax.sharding import Mesh

from models import checkpoint_io, lora
from models.config import ModelConfig
from parallelism import sharding
from parallelism.rules import Rules

# ModelConfig fields that say how a model runs, not what it computes: the run's own apply.
EXECUTION_FIELDS = ('scan_layers', 'remat', 'attention', 'param_dtype', 'dtype')


def enabled(cfg) -> bool:
  return bool(cfg.lora.base)


def fresh_adapters(cfg) -> nnx.State:
  """New adapters (b = 0: the model starts as its base) for cfg.model's weights cfg.lora selects."""
  return lora.init_adapters(cfg.model, checkpoint_io.abstract_params(cfg.model), cfg.lora,
                            jax.random.key(cfg.seed))


def check_base(base: ModelConfig, model: ModelConfig, path: str) -> None:
  """Refuses a base whose architecture differs from the run's model."""
  ours = dataclasses.replace(base, **{f: getattr(model, f) for f in EXECUTION_FIELDS})
  if ours != model:
    diff = [f'{f.name}: base {getattr(base, f.name)!r}, train.model {getattr(model, f.name)!r}'
            for f in dataclasses.fields(model) if getattr(ours, f.name) != getattr(model, f.name)]
    raise ValueError(f'lora.base={path!r} is another model than the one this run trains ('
                     + '; '.join(diff) + '): LoRA adapts the base as it is, so set the model to '
                     "the base's (the gin file's model(...) binding).")


@functools.lru_cache(maxsize=1)
def load_base(path: str, model: ModelConfig, mesh: Mesh, rules: Rules,
              adapters: lora.LoRAConfig | None = None) -> nnx.State:
  """The base's params on `mesh`, checked against `model` (cached: the train and eval steps share
  one copy); with `adapters.base_dtype='int8'` its decoder matrices quantized in place (QLoRA)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f'lora.base={path!r}: no such directory; give a Stoker training workdir '
                            'or a Hugging Face model directory.')
  base_cfg = checkpoint_io.read_config(path)
  check_base(base_cfg, model, path)
  overrides = {f: getattr(model, f) for f in EXECUTION_FIELDS}
  shardings_for = lambda a: sharding.logical_shardings(a, mesh, rules)
  _, params = checkpoint_io.load(path, shardings_for=shardings_for, **overrides)
  if adapters is not None and adapters.base_dtype:
    quantize = functools.partial(lora.quantize_base, lora=adapters)
    params = jax.jit(quantize, donate_argnums=0,
                     out_shardings=shardings_for(jax.eval_shape(quantize, params)))(params)
  return params


def attach(cfg, params, base, dropout_key=None):
  """The model's params for the objective: `params` itself, or with LoRA its base with `params`
  (the adapters) attached."""
  if base is None:
    return params
  return lora.attach(cfg.model, base, params, cfg.lora, dropout_key)
