"""The Llama-family decoder in Flax NNX.

Layers are stacked on a leading 'layers' axis and run under `jax.lax.scan` (one compiled block,
fast compiles for deep models), or unrolled when `scan_layers=False`. Either way each block can
be rematerialised with a `jax.checkpoint` policy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import attention, moe
from models.config import ModelConfig
from models.layers import (MLP, RMSNorm, apply_rope, constrain, einsum, fan_in_init, param,
                           rope_inverse_frequencies, take_rows)

_REMAT = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, optional QKV bias (Qwen2) and q/k norm (Qwen3)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, K, H, pdt = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
    self.impl = cfg.attention
    self.q_DNH = param(rngs, fan_in_init(D), (D, N, H), ('embed', 'heads', 'head_dim'), pdt)
    self.k_DKH = param(rngs, fan_in_init(D), (D, K, H), ('embed', 'kv_heads', 'head_dim'), pdt)
    self.v_DKH = param(rngs, fan_in_init(D), (D, K, H), ('embed', 'kv_heads', 'head_dim'), pdt)
    self.o_NHD = param(rngs, fan_in_init(N * H), (N, H, D), ('heads', 'head_dim', 'embed'), pdt)
    # Optional parts are nnx.data(None) when absent, so the attribute is data either way.
    self.bias = nnx.data(None)
    if cfg.qkv_bias:
      zeros = jax.nn.initializers.zeros
      self.bias = nnx.data(dict(
          q_NH=param(rngs, zeros, (N, H), ('heads', 'head_dim'), pdt),
          k_KH=param(rngs, zeros, (K, H), ('kv_heads', 'head_dim'), pdt),
          v_KH=param(rngs, zeros, (K, H), ('kv_heads', 'head_dim'), pdt)))
    self.q_norm = self.k_norm = nnx.data(None)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(H, cfg.rms_eps, 'head_dim', pdt, rngs)
      self.k_norm = RMSNorm(H, cfg.rms_eps, 'head_dim', pdt, rngs)

  def project_qkv(self, x_BTD, positions_BT, inv_freq):
    """Queries, keys and values with bias, q/k norm and RoPE applied: what attention consumes.

    Serving calls this (and `project_out`) around its paged attention, so both share one copy.
    """
    dt = x_BTD.dtype
    q_BTNH = einsum('BTD,DNH->BTNH', x_BTD, self.q_DNH.get_value())
    k_BTKH = einsum('BTD,DKH->BTKH', x_BTD, self.k_DKH.get_value())
    v_BTKH = einsum('BTD,DKH->BTKH', x_BTD, self.v_DKH.get_value())
    if self.bias is not None:
      q_BTNH += self.bias['q_NH'][...].astype(dt)[None, None]
      k_BTKH += self.bias['k_KH'][...].astype(dt)[None, None]
      v_BTKH += self.bias['v_KH'][...].astype(dt)[None, None]
    if self.q_norm is not None:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
    return q_BTNH, k_BTKH, v_BTKH

  def project_out(self, out_BTNH):
    """The output projection of the attended values, back to the model width."""
    return einsum('BTNH,NHD->BTD', out_BTNH, self.o_NHD.get_value())

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, inv_freq):
    q_BTNH, k_BTKH, v_BTKH = self.project_qkv(x_BTD, positions_BT, inv_freq)
    return self.project_out(attention.attend(self.impl, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT))


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, 'embed', cfg.param_dtype, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps, 'embed', cfg.param_dtype, rngs)
    self.mlp = moe.MoE(cfg, rngs) if cfg.moe else MLP(cfg, rngs)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, inv_freq):
    return self.forward(x_BTD, positions_BT, segment_ids_BT, inv_freq)[0]

  def forward(self, x_BTD, positions_BT, segment_ids_BT, inv_freq):
    """(x_BTD, aux): aux is the MoE MLP's (models/moe.py), {} for a dense block."""
    x_BTD += self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT, inv_freq)
    if isinstance(self.mlp, moe.MoE):
      y_BTD, aux = self.mlp.with_aux(self.mlp_norm(x_BTD))
    else:
      y_BTD, aux = self.mlp(self.mlp_norm(x_BTD)), {}
    x_BTD += y_BTD
    return constrain(x_BTD, ('batch', 'length', 'act_embed')), aux


class Transformer(nnx.Module):
  """Token ids [B, T] -> float32 logits [B, T, V]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D, V, pdt = cfg.d_model, cfg.vocab_size, cfg.param_dtype
    self.embed_VD = param(rngs, fan_in_init(D), (V, D), ('vocab', 'embed'), pdt)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def stacked(rngs):
        return Block(cfg, rngs)
      self.layers = stacked(rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(D, cfg.rms_eps, 'embed', pdt, rngs)
    self.lm_head_DV = nnx.data(None)
    if not cfg.tie_embeddings:
      self.lm_head_DV = param(rngs, fan_in_init(D), (D, V), ('embed', 'vocab'), pdt)

  def inv_freq(self) -> jax.Array:
    cfg = self.cfg
    return rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

  def embed(self, tokens_BT) -> jax.Array:
    """Token ids [B, T] -> activations [B, T, D] in the compute dtype."""
    dt = jnp.dtype(self.cfg.compute_dtype(jax.default_backend()))
    # Gather from a whole table: like every FSDP weight it is all-gathered for use. Gathering
    # from a sharded table leaves rows split over the width, which then cannot be resharded
    # onto the batch axes without a full rematerialisation.
    embed_VD = jax.tree.map(lambda a: constrain(a, (None, None)), self.embed_VD.get_value())
    x_BTD = take_rows(embed_VD, tokens_BT, dt)
    return constrain(x_BTD, ('batch', 'length', 'act_embed'))

  def logits(self, x_BTD) -> jax.Array:
    """Final norm and LM head: activations [B, T, D] -> float32 logits [B, T, V]."""
    x_BTD = self.final_norm(x_BTD)
    head_DV = (self.embed_VD.get_value().T if self.lm_head_DV is None else
               self.lm_head_DV.get_value())
    logits_BTV = einsum('BTD,DV->BTV', x_BTD, head_DV, preferred_element_type=jnp.float32)
    return constrain(logits_BTV, ('batch', 'length', 'vocab'))

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> jax.Array:
    return self.forward(tokens_BT, positions_BT, segment_ids_BT)[0]

  def forward(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """(logits, aux). Dense models: aux is {}. Mixtures of experts: 'moe_loss' (the weighted
    load-balancing + z-loss, mean over layers: what training adds to the objective per token),
    'load_balance' and 'router_z' (unweighted, mean over layers) and 'expert_tokens' ([L, E]
    float32, the assignments each layer's experts received)."""
    cfg = self.cfg
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    inv_freq = self.inv_freq()
    x_BTD = self.embed(tokens_BT)

    def run_block(x_BTD, block_state, graphdef):
      block = nnx.merge(graphdef, block_state)
      return block.forward(x_BTD, positions_BT, segment_ids_BT, inv_freq)

    if cfg.remat != 'none':
      run_block = jax.checkpoint(run_block, policy=_REMAT[cfg.remat], static_argnums=(2,))
    if cfg.scan_layers:
      graphdef, state = nnx.split(self.layers)
      x_BTD, aux = jax.lax.scan(lambda x, s: run_block(x, s, graphdef), x_BTD, state)
    else:
      auxes = []
      for block in self.layers:
        graphdef, state = nnx.split(block)
        x_BTD, layer_aux = run_block(x_BTD, state, graphdef)
        auxes.append(layer_aux)
      aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
    return self.logits(x_BTD), _moe_aux(cfg, aux)


def _moe_aux(cfg: ModelConfig, aux_L: dict) -> dict:
  """The layers' router statistics ([L] / [L, E]) as Transformer.forward returns them."""
  if not aux_L:
    return {}
  lb, z = jnp.mean(aux_L['load_balance']), jnp.mean(aux_L['router_z'])
  return {'moe_loss': cfg.load_balance_loss * lb + cfg.router_z_loss * z, 'load_balance': lb,
          'router_z': z, 'expert_tokens': aux_L['expert_tokens']}


def stack_layers(params: dict) -> dict:
  """Layers stacked on a leading axis ([L, ...] leaves), from either layout of the model."""
  layers = params['layers']
  if all(isinstance(k, int) for k in layers):
    layers = jax.tree.map(lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs), *[layers[i] for i in sorted(layers)])
  return {**params, 'layers': layers}


def unstack_layers(params: dict, scan_layers: bool) -> dict:
  """The layout a ModelConfig with `scan_layers` builds: stacked, or a dict of layers by index."""
  if scan_layers:
    return params
  n = len(jax.tree.leaves(params['layers'])[0])
  return {**params, 'layers': {i: jax.tree.map(lambda x, i=i: x[i], params['layers'])
                               for i in range(n)}}


def unstacked_state(cfg: ModelConfig, params: nnx.State) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
  """The model of `cfg` with its layers unrolled (scan_layers=False): (its config, graphdef,
  `params` re-laid as its state). Stacked params are sliced once, here; params already unrolled
  pass through. What serving runs: XLA copies a layer's slice of a stacked weight before each
  product (dynamic- or static-sliced alike), every step; separate arrays are read in place."""
  cfg = dataclasses.replace(cfg, scan_layers=False)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  pure = nnx.to_pure_dict(params)
  if not all(isinstance(k, int) for k in pure['layers']):
    pure = unstack_layers(pure, scan_layers=False)
  nnx.replace_by_pure_dict(state, pure)
  return cfg, graphdef, state
