"""The optax chain: skip non-finite updates, clip by global norm, AdamW on a warmup+cosine schedule."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from train.config import OptimizerConfig


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params):
  """Weight decay on weight matrices only, not on norms or biases.

  A matrix is a Variable whose logical axes, 'layers' aside, include 'embed' and one more
  (a plain array without names: any array of rank >= 2).
  """
  def one(v):
    if not isinstance(v, nnx.Variable):
      return v.ndim >= 2
    axes = [a for a in (v.get_metadata().get('out_sharding') or ()) if a != 'layers']
    return v.replace('embed' in axes and len(axes) >= 2)
  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """Non-finite gradients leave params and moments untouched and are counted
  (`opt_state.total_notfinite`); the schedule only advances on applied updates."""
  inner = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)
