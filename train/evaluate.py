"""Validation: token-weighted loss and perplexity of the current parameters over a split."""

from __future__ import annotations

import functools
import itertools
import math
from typing import Iterable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.synthetic import Batch
from parallelism import sharding
from parallelism.rules import DEFAULT_RULES, Rules
from train import finetune
from train.config import TrainConfig
from train.step import Bound, abstract_model, batch_spec, loss_sums


def _eval_step(params, batch, *frozen, graphdef, cfg):
  params = finetune.attach(cfg, params, frozen[0]['base'] if frozen else None)
  _, (nll, tokens) = loss_sums(params, graphdef, batch, 0.0)
  return nll, tokens


def compile_eval_step(cfg: TrainConfig, mesh: Mesh, param_shardings, rules: Rules = DEFAULT_RULES):
  """(params, batch) -> (summed NLL, target tokens), compiled once for the training batch shape.
  `params` are what the train state holds: the model's, or with LoRA the adapters (the base is
  bound in here)."""
  graphdef, abstract_params = abstract_model(cfg)
  if finetune.enabled(cfg):
    abstract_params = jax.eval_shape(functools.partial(finetune.fresh_adapters, cfg))
  extra = ({'base': finetune.load_base(cfg.lora.base, cfg.model, mesh, rules, cfg.lora)},
           ) if finetune.enabled(cfg) else ()
  batch = batch_spec(cfg, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  step = jax.jit(functools.partial(_eval_step, graphdef=graphdef, cfg=cfg),
                 in_shardings=(param_shardings, jax.tree.map(lambda b: b.sharding, batch),
                               *jax.tree.map(lambda x: x.sharding, extra)),
                 out_shardings=(replicated, replicated))
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params, param_shardings)
  with sharding.activation_rules(mesh, rules):
    compiled = step.lower(params, batch, *extra).compile()
  return Bound(compiled, extra) if extra else compiled


def evaluate(eval_step, params, batches: Iterable[Batch], shardings: dict,
             max_batches: int = 0) -> dict[str, float]:
  """Sums over `batches` (at most `max_batches` if > 0): {'val_loss', 'val_perplexity', 'val_tokens'}."""
  nll = tokens = 0.0
  for host in itertools.islice(batches, max_batches or None):
    batch = {k: jax.make_array_from_process_local_data(s, np.asarray(host[k]))
             for k, s in shardings.items()}
    n, t = eval_step(params, batch)
    nll, tokens = nll + float(n), tokens + float(t)
  if not tokens:
    raise ValueError('the validation split produced no target tokens; prepare more data or '
                     'lower train.seq_len.')
  loss = nll / tokens
  return {'val_loss': loss, 'val_perplexity': math.exp(min(loss, 700.0)), 'val_tokens': tokens}
