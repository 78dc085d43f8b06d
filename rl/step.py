"""The GRPO train step: the trainer's log-probabilities of sampled completions, the clipped
objective (rl/grpo.py) and the optimizer update (train/step.py's apply_grads), compiled once.

A batch holds B sampled sequences, prompt then completion, padded to T = rl.seq_len:
  inputs_BT, positions_BT  the tokens and their positions (padding: token 0 past the end)
  targets_BT               inputs shifted left: position t predicts targets[t]
  mask_BT                  1 where the target is a completion token (the prompt is not trained)
  old_BT                   the sampler's log-probability of each target (the engine's, at sampling)
  advantages_B             each sequence's group-relative advantage
Padding sits after each sequence, so under causal attention it changes nothing before it.

The importance ratio is exp(trainer logp - sampler logp). On the first mini-batch of a batch the
trainer holds the sampler's parameters, and in float32 the two log-probabilities agree within 1e-4
(tests/serve/test_logprobs.py): the ratio is 1 up to that and only its gradient matters. It moves
away from 1 where sampler and trainer differ: later mini-batches (the policy has moved), and an
engine that samples in another precision (engine.weight_dtype / kv_dtype int8, a bfloat16 model),
whose gap the ratio then corrects and the 'sampler_gap' metric reports.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import transformer
from parallelism import sharding
from parallelism.rules import DEFAULT_RULES, Rules
from rl import grpo
from train import finetune
from train.step import TrainState, apply_grads

KEYS = ('inputs_BT', 'positions_BT', 'targets_BT', 'mask_BT', 'old_BT', 'advantages_B')


def graphdef_of(model_cfg):
  return nnx.split(nnx.eval_shape(lambda: transformer.Transformer(model_cfg, nnx.Rngs(0))))[0]


def token_logprobs(graphdef, params, inputs_BT, positions_BT, targets_BT) -> jax.Array:
  """float32 log softmax(logits)[target] at every position: [B, T]."""
  segments_BT = jnp.ones_like(inputs_BT)
  logits_BTV = nnx.merge(graphdef, params)(inputs_BT, positions_BT, segments_BT)
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def objective(params, batch, frozen, *, graphdef, cfg):
  """The GRPO loss of a batch and its metrics. `frozen`: {'base': the LoRA base} (then `params` are
  the adapters, and the reference is the base: adapters off), or {'reference': the initial policy}
  when the KL penalty needs one, or {}."""
  args = (batch['inputs_BT'], batch['positions_BT'], batch['targets_BT'])
  logp_BT = token_logprobs(graphdef, finetune.attach(cfg, params, frozen.get('base')), *args)
  ref_BT = None
  if cfg.beta:
    reference = frozen['base'] if 'base' in frozen else frozen['reference']
    ref_BT = jax.lax.stop_gradient(token_logprobs(graphdef, reference, *args))
  value, metrics = grpo.loss(logp_BT, batch['old_BT'], batch['advantages_B'], batch['mask_BT'],
                             normalisation=cfg.normalisation, eps_low=cfg.eps_low,
                             eps_high=cfg.eps_high, ref_BT=ref_BT, beta=cfg.beta)
  gap_BT = jnp.abs(jax.lax.stop_gradient(logp_BT) - batch['old_BT']) * batch['mask_BT']
  return value, {**metrics, 'loss': value, 'sampler_gap': jnp.max(gap_BT)}


def batch_spec(cfg, mesh, rules: Rules = DEFAULT_RULES) -> dict:
  """The abstract mini-batch (its sharding: rows over the data axes) the compiled step takes."""
  B = cfg.samples_per_step // cfg.minibatches
  ways = 1
  for a in sharding.batch_axes(mesh, rules):
    ways *= mesh.shape[a]
  if B % ways:
    raise ValueError(f'a mini-batch of {B} samples (rl.prompts_per_step x rl.group_size / '
                     f'rl.minibatches) does not split over the {ways} data-parallel devices; make it '
                     'a multiple, or use fewer devices (--host_devices).')
  rows, flat = sharding.batch_sharding(mesh, 2, rules), sharding.batch_sharding(mesh, 1, rules)
  out = {}
  for k in KEYS:
    dtype = jnp.float32 if k in ('mask_BT', 'old_BT', 'advantages_B') else jnp.int32
    shape = (B,) if k == 'advantages_B' else (B, cfg.seq_len)
    out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=flat if k == 'advantages_B' else rows)
  return out


class Step(NamedTuple):
  """The compiled step as two computations (as train/step.py's split step): `grad` reads the state
  and donates nothing; `update` applies the gradients. Neither donates the state: the state before
  an RL step must stay intact through all of its mini-batches, for a just-in-time save."""
  grad: Any  # (state, batch, frozen) -> (grads, metrics)
  update: Any  # (state, grads) -> (state, metrics)
  frozen: dict  # the frozen inputs (objective's `frozen`) the loop passes to grad


def compile_step(cfg, mesh, tx, state_shardings, frozen: dict, rules: Rules = DEFAULT_RULES) -> Step:
  graphdef = graphdef_of(cfg.model)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = batch_spec(cfg, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          jax.eval_shape(lambda: abstract_state(cfg, tx)), state_shardings)

  def grad_fn(state, batch, frozen):
    grads, metrics = jax.grad(functools.partial(objective, graphdef=graphdef, cfg=cfg),
                              has_aux=True)(state.params, batch, frozen)
    return grads, {**metrics, 'grad_norm': _norm(grads)}

  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  grad = jax.jit(grad_fn, in_shardings=(state_shardings, {k: v.sharding for k, v in spec.items()},
                                        frozen_shardings),
                 out_shardings=(state_shardings.params, replicated))
  update = jax.jit(functools.partial(apply_grads, tx=tx),
                   in_shardings=(state_shardings, state_shardings.params),
                   out_shardings=(state_shardings, replicated))
  with sharding.activation_rules(mesh, rules):
    grad = grad.lower(abstract, spec, frozen).compile()
    update = update.lower(abstract, abstract.params).compile()
  return Step(grad, update, frozen)


def _norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def fresh_params(cfg) -> nnx.State:
  """What the train state trains at step 0: new LoRA adapters (b = 0: the policy is the base), or
  a new model from rl.seed."""
  if finetune.enabled(cfg):
    return finetune.fresh_adapters(cfg)
  return nnx.state(transformer.Transformer(cfg.model, nnx.Rngs(cfg.seed)))


def abstract_state(cfg, tx) -> TrainState:
  params = fresh_params(cfg)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def pack(cfg, prompts: list, completions: list, old_logprobs: list, advantages: np.ndarray) -> dict:
  """Host arrays of KEYS for sampled sequences (prompt ids, completion ids, the sampler's logprob
  of each completion token, advantages [B]); raises if one does not fit rl.seq_len."""
  B, T = len(prompts), cfg.seq_len
  out = {k: np.zeros((B, T), np.float32 if k in ('mask_BT', 'old_BT') else np.int32)
         for k in KEYS[:-1]}
  out['positions_BT'][:] = np.arange(T)
  for b, (p, c, lp) in enumerate(zip(prompts, completions, old_logprobs)):
    ids = list(p) + list(c)
    if len(ids) > T:
      raise ValueError(f'a prompt of {len(p)} tokens and a completion of {len(c)} do not fit '
                       f'rl.seq_len={T}; raise it to at least {len(p)} + rl.max_tokens.')
    out['inputs_BT'][b, :len(ids)] = ids
    out['targets_BT'][b, :len(ids) - 1] = ids[1:]
    span = slice(len(p) - 1, len(ids) - 1)  # positions whose target is a completion token
    out['mask_BT'][b, span] = 1.0
    out['old_BT'][b, span] = lp
  out['advantages_B'] = np.asarray(advantages, np.float32)
  return out
