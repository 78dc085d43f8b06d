"""Group relative policy optimisation (GRPO; DeepSeekMath, 2024): advantages and the clipped objective.

For a prompt, G completions are sampled and scored. Each completion's advantage is its reward
against its group's (r - mean) / (std + eps); `scale_std=False` drops the division (Dr. GRPO, 2025,
which found it favours groups of nearly equal rewards). Every token of a completion shares its
advantage. Per token, with the log-probabilities of the policy being trained (logp), of the policy
that sampled (old) and of the reference (ref):

    ratio = exp(logp - old)
    term  = min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) - beta k3
    k3    = exp(ref - logp) - (ref - logp) - 1          (Schulman's unbiased, non-negative KL estimator)

and the loss is -term averaged by one of three rules: 'sequence' (each completion's mean over its
tokens, then the mean over completions: GRPO), 'token' (the sum over all tokens / their count:
DAPO), 'constant' (the sum / (completions x max_tokens): Dr. GRPO). When the sampler and the
trainer compute the same log-probabilities (one parameter version per batch, the first optimizer
step on it) the ratio is 1 and only its gradient matters; later mini-batch steps on the same
samples see ratios away from 1, which the clipping bounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALISATIONS = ('sequence', 'token', 'constant')


def advantages(rewards_PG: jax.Array, scale_std: bool = True, eps: float = 1e-6) -> jax.Array:
  """[P prompts, G completions] rewards -> advantages against each prompt's group."""
  rewards_PG = rewards_PG.astype(jnp.float32)
  centred = rewards_PG - jnp.mean(rewards_PG, axis=1, keepdims=True)
  if not scale_std:
    return centred
  return centred / (jnp.std(rewards_PG, axis=1, keepdims=True) + eps)


def token_terms(logp_BT, old_BT, advantages_B, *, eps_low: float = 0.2, eps_high: float = 0.2,
                ref_BT=None, beta: float = 0.0):
  """Per-token objective terms [B, T] (to be maximised), and (clipped, kl) [B, T] for the metrics."""
  ratio_BT = jnp.exp(logp_BT - old_BT)
  a_B1 = advantages_B[:, None]
  unclipped = ratio_BT * a_B1
  clipped = jnp.clip(ratio_BT, 1 - eps_low, 1 + eps_high) * a_B1
  term_BT = jnp.minimum(unclipped, clipped)
  was_clipped = (clipped < unclipped).astype(jnp.float32)
  kl_BT = jnp.zeros_like(logp_BT)
  if beta:
    d_BT = ref_BT - logp_BT
    kl_BT = jnp.exp(d_BT) - d_BT - 1
    term_BT = term_BT - beta * kl_BT
  return term_BT, was_clipped, kl_BT


def loss(logp_BT, old_BT, advantages_B, mask_BT, *, normalisation: str = 'sequence',
         eps_low: float = 0.2, eps_high: float = 0.2, ref_BT=None, beta: float = 0.0):
  """The GRPO loss of B completions' tokens (mask_BT: 1 on completion tokens), and its metrics."""
  if normalisation not in NORMALISATIONS:
    raise ValueError(f'normalisation must be one of {NORMALISATIONS}; got {normalisation!r}.')
  mask_BT = mask_BT.astype(jnp.float32)
  term_BT, clipped_BT, kl_BT = token_terms(logp_BT, old_BT, advantages_B, eps_low=eps_low,
                                           eps_high=eps_high, ref_BT=ref_BT, beta=beta)
  tokens_B = jnp.sum(mask_BT, axis=1)
  total = jnp.maximum(jnp.sum(tokens_B), 1.0)
  if normalisation == 'sequence':
    per_seq = jnp.sum(term_BT * mask_BT, axis=1) / jnp.maximum(tokens_B, 1.0)
    value = -jnp.mean(per_seq)
  elif normalisation == 'token':
    value = -jnp.sum(term_BT * mask_BT) / total
  else:
    value = -jnp.sum(term_BT * mask_BT) / (mask_BT.shape[0] * mask_BT.shape[1])
  metrics = {'clip_fraction': jnp.sum(clipped_BT * mask_BT) / total,
             'kl': jnp.sum(kl_BT * mask_BT) / total,
             'response_length': jnp.mean(tokens_B)}
  return value, metrics
