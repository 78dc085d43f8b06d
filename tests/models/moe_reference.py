"""Expert loads routed in numpy: what the MoE tests count a model's router against.

Each layer's MoE input comes from the model's own attention and norm; the routing (router logits,
top-k, counting) is numpy's, so a bug in models/moe.py's routing or counting shows as a difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import transformer


def blocks(model: transformer.Transformer) -> list:
  """The model's decoder blocks, one per layer (stacked layers sliced)."""
  if not model.cfg.scan_layers:
    return list(model.layers)
  graphdef, state = nnx.split(model.layers)
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
          for i in range(model.cfg.num_layers)]


@nnx.jit
def _mlp_inputs(model: transformer.Transformer, tokens_BT, positions_BT, segment_ids_BT):
  """[L, B, T, D]: each layer's MoE input, by the model's own attention and norms (one compiled
  program per shape: eager, each op of each layer would dispatch, and compile, apart)."""
  inv_freq = model.inv_freq()
  x_BTD = model.embed(tokens_BT)
  h_LBTD = []
  for block in blocks(model):
    h_LBTD.append(block.mlp_norm(x_BTD + block.attn(block.attn_norm(x_BTD), positions_BT,
                                                    segment_ids_BT, inv_freq)))
    x_BTD = block(x_BTD, positions_BT, segment_ids_BT, inv_freq)
  return jnp.stack(h_LBTD)


def expert_tokens(model: transformer.Transformer, tokens_BT, positions_BT=None,
                  segment_ids_BT=None, counted_BT=None) -> np.ndarray:
  """int64 [L, E]: per layer, how many of the tokens (those where `counted_BT` is True, default
  all) chose each expert among their top k router logits."""
  cfg = model.cfg
  tokens_BT = jnp.asarray(tokens_BT)
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones_like(tokens_BT)
  counted_BT = (np.ones(tokens_BT.shape, bool) if counted_BT is None
                else np.asarray(counted_BT, bool))
  h_LBTD = np.asarray(_mlp_inputs(model, tokens_BT, jnp.asarray(positions_BT),
                                  jnp.asarray(segment_ids_BT)), np.float32)
  counts_LE = np.zeros((cfg.num_layers, cfg.num_experts), np.int64)
  for layer, block in enumerate(blocks(model)):
    logits_BTE = h_LBTD[layer] @ np.asarray(block.mlp.router_DE[...], np.float32)
    experts_BTK = np.argsort(-logits_BTE, axis=-1, kind='stable')[..., :cfg.experts_per_token]
    counts_LE[layer] = np.bincount(experts_BTK[counted_BT].reshape(-1), minlength=cfg.num_experts)
  return counts_LE
