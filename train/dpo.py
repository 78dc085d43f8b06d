"""Direct preference optimisation (Rafailov et al. 2023): the loss and its metrics, as pure functions.

For a prompt with a chosen response y+ and a rejected one y-, and log-probabilities summed over each
response's tokens under the policy (pi) and the frozen reference (ref):

    z = beta * ((log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-)))
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)

eps is label smoothing (conservative DPO: the labels are flipped with probability eps). The implicit
rewards are beta * (log pi - log ref); a pair is ranked right when the chosen reward is the larger.
With LoRA the reference is the base with the adapters off, so no second copy of the model is held.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Sum over the positions `mask_BT` keeps of log softmax(logits)[target]: [B], float32."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  picked_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum(picked_BT * mask_BT.astype(jnp.float32), axis=-1)


def losses(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
           ref_rejected: jax.Array, beta: float, label_smoothing: float = 0.0):
  """Per-pair DPO losses [B] and (chosen, rejected) rewards [B] from summed log-probabilities [B]."""
  chosen = beta * (policy_chosen - ref_chosen)
  rejected = beta * (policy_rejected - ref_rejected)
  z = chosen - rejected
  loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  return loss, chosen, rejected


def metrics(loss: jax.Array, chosen: jax.Array, rejected: jax.Array, policy_chosen: jax.Array,
            policy_rejected: jax.Array) -> dict[str, jax.Array]:
  """Means over the pairs: what metrics.jsonl logs for a DPO step."""
  return {
      'dpo_loss': jnp.mean(loss),
      'reward_accuracy': jnp.mean((chosen > rejected).astype(jnp.float32)),
      'reward_margin': jnp.mean(chosen - rejected),
      'reward_chosen': jnp.mean(chosen),
      'reward_rejected': jnp.mean(rejected),
      'logp_chosen': jnp.mean(policy_chosen),
      'logp_rejected': jnp.mean(policy_rejected),
  }
