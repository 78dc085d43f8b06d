"""The pure, sharded train step: `train_step(state, batch) -> (state, metrics)`.

Gradient accumulation scans over microbatches with float32 accumulators and divides by the
total number of target tokens once at the end, so k microbatches give the same update as one
batch of k times the size.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from models import transformer
from parallelism import sharding
from parallelism.rules import DEFAULT_RULES, Rules
from train import distill, dpo, finetune
from train.config import TrainConfig
from train.optimizer import schedule


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
  params: nnx.State
  opt_state: Any


BATCH_KEYS = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')


def loss_sums(params, graphdef, batch, z_loss: float):
  """Sum over target tokens of the masked cross-entropy (+ z-loss), and the token count."""
  model = nnx.merge(graphdef, params)
  logits_BTV = model(batch['inputs'], batch['positions'], batch['segment_ids'])
  return _ce_sums(logits_BTV, batch, z_loss)


def _ce_sums(logits_BTV, batch, z_loss: float):
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, batch['targets'][..., None], axis=-1)[..., 0]
  weights_BT = batch['loss_mask'].astype(jnp.float32)
  nll = jnp.sum((logz_BT - target_logit_BT) * weights_BT)
  objective = nll + z_loss * jnp.sum(jnp.square(logz_BT) * weights_BT) if z_loss else nll
  return objective, (nll, jnp.sum(weights_BT))


def objective_sums(params, graphdef, batch, cfg: TrainConfig, teacher=None, base=None,
                   dropout_key=None, reference=None):
  """The training objective and the sums the metrics need: 'nll', 'tokens' and, when distilling
  from `teacher` ((graphdef, params), train/distill.py), 'kl'. With a LoRA `base`, `params` are
  the adapters (train/finetune.py). With DPO the objective is dpo_sums'."""
  policy = finetune.attach(cfg, params, base, dropout_key)
  if cfg.dpo.beta:
    return dpo_sums(policy, base if reference is None else reference, graphdef, batch, cfg)
  params = policy
  model = nnx.merge(graphdef, params)
  logits_BTV, aux = model.forward(batch['inputs'], batch['positions'], batch['segment_ids'])
  objective, (nll, tokens) = _ce_sums(logits_BTV, batch, cfg.z_loss)
  sums = {'nll': nll, 'tokens': tokens}
  if teacher is not None:
    sums['kl'] = distill.kl_sum(distill.teacher_logits(*teacher, batch), logits_BTV,
                                batch['loss_mask'].astype(jnp.float32), cfg.distill)
    objective = distill.objective(objective, sums['kl'], cfg.distill)
  if aux:  # a mixture of experts: the router's losses join per target token, like the rest
    sums.update(moe_loss=aux['moe_loss'] * tokens, expert_tokens_LE=aux['expert_tokens'])
    objective = objective + sums['moe_loss']
  return objective, sums


def dpo_sums(policy, reference, graphdef, batch, cfg: TrainConfig):
  """DPO over a batch of P pairs, rows [0, P) chosen and [P, 2P) rejected (data/preference.py),
  log-probabilities summed over each response's tokens (the loss mask). The summed loss, and sums
  for the metrics: 'nll' (the DPO loss), 'tokens' (the pairs: what grad_step divides by) and
  'dpo_*' (means over the pairs once divided)."""
  def logprobs(params):
    logits_BTV = nnx.merge(graphdef, params)(batch['inputs'], batch['positions'],
                                             batch['segment_ids'])
    return dpo.sequence_logprobs(logits_BTV, batch['targets'], batch['loss_mask'])
  policy_B = logprobs(policy)
  reference_B = jax.lax.stop_gradient(logprobs(jax.lax.stop_gradient(reference)))
  P = policy_B.shape[0] // 2
  loss, chosen, rejected = dpo.losses(policy_B[:P], policy_B[P:], reference_B[:P], reference_B[P:],
                                      cfg.dpo.beta, cfg.dpo.label_smoothing)
  sums = {'nll': jnp.sum(loss), 'tokens': jnp.asarray(P, jnp.float32),
          'dpo_reward_accuracy': jnp.sum((chosen > rejected).astype(jnp.float32)),
          'dpo_reward_margin': jnp.sum(chosen - rejected),
          'dpo_logp_chosen': jnp.sum(policy_B[:P]), 'dpo_logp_rejected': jnp.sum(policy_B[P:])}
  assert set(sums) == {'nll', 'tokens', *DPO_SUMS}
  return jnp.sum(loss), sums


DPO_SUMS = ('dpo_reward_accuracy', 'dpo_reward_margin', 'dpo_logp_chosen', 'dpo_logp_rejected')


def _microbatches(batch, k: int):
  """[k*b, ...] -> [k, b, ...], microbatch i taking rows i, i+k, ...: each device keeps its rows."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def grad_step(state: TrainState, batch, frozen=None, *, graphdef, cfg: TrainConfig,
              teacher_graphdef=None):
  """Gradients of the batch's mean loss at `state`, and the step's metrics. Reads `state` only.

  `frozen`: the inputs that are not trained, {'teacher': params, 'base': params} (either may be
  absent)."""
  frozen = frozen or {}
  teacher = None if teacher_graphdef is None else (teacher_graphdef, frozen['teacher'])
  key = None
  if 'base' in frozen and cfg.lora.dropout > 0:
    key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
  grad_fn = jax.grad(functools.partial(objective_sums, graphdef=graphdef, cfg=cfg, teacher=teacher,
                                       base=frozen.get('base'), reference=frozen.get('reference')),
                     has_aux=True)
  if cfg.microbatches == 1:
    grads, sums = grad_fn(state.params, batch=batch, dropout_key=key)
  else:
    def accumulate(carry, micro):
      micro, i = micro
      g, s = grad_fn(state.params, batch=micro,
                     dropout_key=None if key is None else jax.random.fold_in(key, i))
      acc_g, acc_s = carry
      acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
      return (acc_g, jax.tree.map(jnp.add, acc_s, s)), None
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    names = ('nll', 'tokens') + ('kl',) * bool(teacher) + DPO_SUMS * bool(cfg.dpo.beta)
    sums0 = {k: jnp.zeros((), jnp.float32) for k in names}
    if cfg.model.moe:
      sums0.update(moe_loss=jnp.zeros((), jnp.float32), expert_tokens_LE=jnp.zeros(
          (cfg.model.num_layers, cfg.model.num_experts), jnp.float32))
    (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0),
                                    (_microbatches(batch, cfg.microbatches),
                                     jnp.arange(cfg.microbatches)))
  nll, tokens = sums['nll'], sums['tokens']
  denom = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denom).astype(p.dtype), grads,
                       state.params)
  # The schedule is evaluated at the number of updates applied before this one.
  applied = state.step - state.opt_state.total_notfinite
  metrics = {
      'loss': nll / denom,
      'grad_norm': optax.tree.norm(grads),
      'learning_rate': schedule(cfg.optimizer, cfg.steps)(applied),
      'tokens': tokens,
  }
  if 'kl' in sums:  # distilling: the two terms of the objective apart (per target token)
    metrics.update(kl=sums['kl'] / denom, ce=nll / denom)
  if 'expert_tokens_LE' in sums:  # mixture of experts: router loss; busiest, idlest expert / mean
    load_LE = sums['expert_tokens_LE'] / jnp.mean(sums['expert_tokens_LE'], -1, keepdims=True)
    metrics.update(moe_loss=sums['moe_loss'] / denom, expert_load_max=jnp.max(load_LE),
                   expert_load_min=jnp.min(load_LE))
  metrics.update({k[len('dpo_'):]: v / denom for k, v in sums.items() if k.startswith('dpo_')})
  return grads, metrics


def apply_grads(state: TrainState, grads, *, tx: optax.GradientTransformation):
  """The optimizer update: the only computation that changes params and optimizer state."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'skipped_steps': opt_state.total_notfinite,
             'nonfinite_streak': opt_state.notfinite_count}
  return TrainState(state.step + 1, params, opt_state), metrics


def train_step(state: TrainState, batch, frozen=None, *, graphdef,
               tx: optax.GradientTransformation, cfg: TrainConfig, teacher_graphdef=None):
  """One optimizer step: grad_step then apply_grads, fused into one computation."""
  grads, metrics = grad_step(state, batch, frozen, graphdef=graphdef, cfg=cfg,
                             teacher_graphdef=teacher_graphdef)
  state, update_metrics = apply_grads(state, grads, tx=tx)
  return state, {**metrics, **update_metrics}


def abstract_model(cfg: TrainConfig):
  """(graphdef, abstract params) of the model, without allocating anything."""
  return nnx.split(nnx.eval_shape(lambda: transformer.Transformer(cfg.model, nnx.Rngs(cfg.seed))))


def fresh_state(cfg: TrainConfig, tx: optax.GradientTransformation) -> TrainState:
  """Step 0: a new model, or with LoRA new adapters (the base is a frozen input, not state)."""
  if finetune.enabled(cfg):
    params = finetune.fresh_adapters(cfg)
  else:
    params = nnx.state(transformer.Transformer(cfg.model, nnx.Rngs(cfg.seed)))
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def init_train_state(cfg: TrainConfig, mesh: Mesh, tx: optax.GradientTransformation,
                     rules: Rules = DEFAULT_RULES):
  """A freshly initialised TrainState, created sharded. Returns (state, state shardings)."""
  return sharding.init_sharded(functools.partial(fresh_state, cfg, tx), mesh, rules)


def batch_spec(cfg: TrainConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Abstract global batch with its sharding: what the compiled step expects."""
  data_ways = 1
  for a in sharding.batch_axes(mesh, rules):
    data_ways *= mesh.shape[a]
  if cfg.batch_size % (data_ways * cfg.microbatches):
    raise ValueError(f'train.batch_size ({cfg.batch_size}) must be a multiple of the data-parallel '
                     f'ways ({data_ways}) x train.microbatches ({cfg.microbatches}).')
  spec = sharding.batch_sharding(mesh, 2, rules)
  shape = (cfg.batch_size, cfg.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == 'loss_mask' else jnp.int32,
                                  sharding=spec) for k in BATCH_KEYS}


def abstract_state(cfg: TrainConfig, tx: optax.GradientTransformation, state_shardings):
  """The TrainState's shapes and dtypes with the given shardings (restore and compile targets)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      jax.eval_shape(functools.partial(fresh_state, cfg, tx)), state_shardings)


def compile_train_step(cfg: TrainConfig, mesh: Mesh, tx: optax.GradientTransformation,
                       state_shardings, rules: Rules = DEFAULT_RULES, frozen=None):
  """Lowers and compiles the fused step once for the config's shapes; the state is donated.
  `frozen`: frozen_args' result, when the caller has the frozen inputs already."""
  graphdef, _ = abstract_model(cfg)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch = batch_spec(cfg, mesh, rules)
  extra, extra_shardings, kw = frozen or frozen_args(cfg, mesh, rules)
  step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg, **kw),
                 in_shardings=(state_shardings, jax.tree.map(lambda b: b.sharding, batch),
                               *extra_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
  with sharding.activation_rules(mesh, rules):
    compiled = step.lower(abstract_state(cfg, tx, state_shardings), batch, *extra).compile()
  return Bound(compiled, extra) if extra else compiled


class Bound:
  """A compiled step with its trailing frozen arguments bound (they stay on the devices, passed
  at every call, never donated); other attributes (memory_analysis, ...) are the compiled step's."""

  def __init__(self, compiled, extra: tuple):
    self.compiled, self.extra = compiled, extra

  def __call__(self, *args):
    return self.compiled(*args, *self.extra)

  def __getattr__(self, name):
    return getattr(self.compiled, name)


def frozen_args(cfg: TrainConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """(extra step arguments, their shardings, static keywords): the frozen inputs, as one dict
  {'teacher': params (cfg.distill), 'base': params (cfg.lora)}; no argument when neither is set."""
  frozen, kw = {}, {}
  teacher = distill.load_teacher(cfg, mesh, rules)
  if teacher is not None:
    frozen['teacher'], kw['teacher_graphdef'] = teacher.params, teacher.graphdef
  if finetune.enabled(cfg):
    frozen['base'] = finetune.load_base(cfg.lora.base, cfg.model, mesh, rules, cfg.lora)
  elif cfg.dpo.beta:  # full fine-tuning: a frozen copy is the reference
    frozen['reference'] = finetune.load_base(cfg.dpo.reference, cfg.model, mesh, rules)
  if not frozen:
    return (), (), kw
  return (frozen,), (jax.tree.map(lambda x: x.sharding, frozen),), kw


class SplitStep(NamedTuple):
  """The step as two computations over flat lists of the state's arrays, for just-in-time
  checkpointing (compile_split_step). Flattening the nnx State costs about a millisecond of host
  time per call; the loop dispatches these two back to back while the devices wait, so they take
  and return lists (flatten/unflatten convert, off that path)."""
  grad: Any  # (leaves, batch) -> (grad leaves, metrics); donates nothing
  update: Any  # (leaves, grad leaves) -> (leaves, metrics); donates the leaves
  treedef: Any

  def flatten(self, state: TrainState) -> list:
    return self.treedef.flatten_up_to(state)

  def unflatten(self, leaves) -> TrainState:
    return self.treedef.unflatten(leaves)


def compile_split_step(cfg: TrainConfig, mesh: Mesh, tx: optax.GradientTransformation,
                       state_shardings, rules: Rules = DEFAULT_RULES) -> SplitStep:
  """The step as two computations, for just-in-time checkpointing: the gradient pass reads the
  state and donates nothing, so the pre-step state stays intact (and savable) however the long
  forward/backward pass ends; the short optimizer update is the only place the state is donated
  and replaced."""
  graphdef, _ = abstract_model(cfg)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch = batch_spec(cfg, mesh, rules)
  state = abstract_state(cfg, tx, state_shardings)
  leaves, treedef = jax.tree.flatten(state)
  grads_treedef = jax.tree.structure(state.params)

  extra, extra_shardings, kw = frozen_args(cfg, mesh, rules)

  def grad_leaves(leaves, batch, *frozen):
    grads, metrics = grad_step(treedef.unflatten(leaves), batch, *frozen,
                               graphdef=graphdef, cfg=cfg, **kw)
    return grads_treedef.flatten_up_to(grads), metrics

  def update_leaves(leaves, grads):
    new, metrics = apply_grads(treedef.unflatten(leaves), grads_treedef.unflatten(grads), tx=tx)
    return treedef.flatten_up_to(new), metrics

  shardings = [x.sharding for x in leaves]
  grads_shardings = [x.sharding for x in jax.tree.leaves(state.params)]
  grad_fn = jax.jit(grad_leaves, in_shardings=(shardings, jax.tree.map(lambda b: b.sharding, batch),
                                               *extra_shardings),
                    out_shardings=(grads_shardings, replicated))
  update_fn = jax.jit(update_leaves, in_shardings=(shardings, grads_shardings),
                      out_shardings=(shardings, replicated), donate_argnums=0)
  with sharding.activation_rules(mesh, rules):
    grad = grad_fn.lower(leaves, batch, *extra).compile()
    update = update_fn.lower(leaves, jax.tree.leaves(state.params)).compile()
  if extra:  # the frozen params ride along as the gradient pass's last argument
    grad = Bound(grad, extra)
  return SplitStep(grad, update, treedef)
