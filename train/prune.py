"""Structured pruning by activation importance (the Minitron recipe, Muralidharan et al. 2024).

Three steps, each a pure function over the model's params as a nested dict of arrays with the layers
stacked on a leading axis (`stack_layers` converts an unrolled model's):

  1. `activation_stats`: one forward pass per calibration batch, block by block with the model's own
     modules, summing over the target tokens the loss mask keeps
       neurons [L, F]   |silu(x W_gate) * (x W_up)|, the gated hidden activation of each MLP neuron;
       groups  [L, K]   the norm of each GQA group's share of the attention output (a key/value head
                        and its N/K query heads, through W_o): groups go whole, so GQA stays valid;
       channels [D]     |RMSNorm(x)| of every normalised residual (each block's two, and the final);
       blocks  [L]      block importance 1 - cos(block input, block output) (ShortGPT, Men et al.
                        2024); the default (and only) layer criterion: it costs nothing beyond the
                        same forward pass, where ranking by the validation-loss increase of dropping
                        each layer costs L more passes, and Minitron found the two pick alike layers.
  2. `choose_sizes` rounds keep fractions to sizes the mesh and kernels accept, and `select` keeps the
     most important units of each kind (layers in their original order).
  3. `slice_params` cuts every weight down to the kept units. Dropping MLP neurons, GQA groups or whole
     layers is exact: the pruned model computes what the original computes with those units zeroed
     (or those blocks skipped). Dropping embedding channels is not: RMSNorm's mean runs over fewer
     channels, so that model needs the distillation that follows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import attention, transformer
from models.transformer import stack_layers, unstack_layers  # noqa: F401  (re-exported)
from models.config import AttentionImpl, ModelConfig

FRACTIONS = ('mlp_keep', 'heads_keep', 'layers_keep', 'embed_keep')


@dataclasses.dataclass(frozen=True)
class KeepFractions:
  """The share of each kind of unit to keep; 1.0 keeps all."""

  mlp_keep: float = 0.5
  heads_keep: float = 0.5
  layers_keep: float = 0.75
  embed_keep: float = 1.0

  def __post_init__(self):
    for name in FRACTIONS:
      value = getattr(self, name)
      if not 0 < value <= 1:
        raise ValueError(f'--{name.replace("_", "-")} {value}: a keep fraction must be in (0, 1] '
                         f'(0.5 keeps half, 1 keeps all).')


@dataclasses.dataclass(frozen=True)
class Keep:
  """What survives: kept layer indices [L'], and per kept layer the kept groups and neurons."""

  layers: np.ndarray  # [L'] original layer indices, ascending
  groups: np.ndarray  # [L', K'] kv-head groups kept in each kept layer, ascending
  neurons: np.ndarray  # [L', F'] MLP neurons kept in each kept layer, ascending
  channels: np.ndarray  # [D'] embedding channels kept, ascending


def _rounded(total: int, fraction: float, unit: int, flag: str, what: str, why: str) -> int:
  kept = int(round(total * fraction / unit)) * unit
  if kept < unit:
    raise ValueError(f'--{flag} {fraction} keeps {total * fraction:.2f} of {total} {what}, and '
                     f'{why} needs a multiple of {unit}: use --{flag} >= {unit / total:.3g} '
                     f'(or a mesh with fewer ways on that axis).')
  return min(kept, total)


def choose_sizes(cfg: ModelConfig, fractions: KeepFractions, mesh_shape: dict[str, int]) -> dict:
  """The pruned ModelConfig's sizes. Units: key/value groups in multiples of the tensor axis (when
  the original count was), so heads stay divisible by it and N % K == 0 holds by construction; MLP
  width a multiple of 128 (where the original was) and of the tensor axis; the model width a
  multiple of the fsdp axis (where the original was)."""
  tensor, fsdp = mesh_shape.get('tensor', 1), mesh_shape.get('fsdp', 1)
  K, F, D = cfg.num_kv_heads, cfg.mlp_dim, cfg.d_model
  group_unit = tensor if K % tensor == 0 else 1
  mlp_unit = math.lcm(128 if F % 128 == 0 else 1, tensor if F % tensor == 0 else 1)
  embed_unit = fsdp if D % fsdp == 0 else 1
  num_kv_heads = _rounded(K, fractions.heads_keep, group_unit, 'heads-keep', 'key/value-head groups',
                          f'the tensor axis ({tensor} ways)')
  return dict(
      num_layers=_rounded(cfg.num_layers, fractions.layers_keep, 1, 'layers-keep', 'layers', 'a model'),
      num_kv_heads=num_kv_heads, num_heads=num_kv_heads * (cfg.num_heads // K),
      mlp_dim=_rounded(F, fractions.mlp_keep, mlp_unit, 'mlp-keep', 'MLP neurons',
                       f'the kernels (128-wide tiles) and the tensor axis ({tensor} ways)'),
      d_model=_rounded(D, fractions.embed_keep, embed_unit, 'embed-keep', 'embedding channels',
                       f'the fsdp axis ({fsdp} ways)'))


def _model(cfg: ModelConfig, params: dict) -> transformer.Transformer:
  """The model with `params` (stacked layers), built to run block by block in plain XLA."""
  cfg = dataclasses.replace(cfg, scan_layers=True, remat='none', attention=AttentionImpl.XLA)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def _masked_sum(x, w_BT, keep_last: int = 1):
  """Sum of x [B, T, ...] over batch and length, weighted by w_BT."""
  return jnp.einsum('BT...,BT->...', x, w_BT) if keep_last else jnp.sum(x * w_BT)


@nnx.jit
def _batch_stats(model: transformer.Transformer, batch: dict) -> dict:
  positions_BT, segment_ids_BT = batch['positions'], batch['segment_ids']
  w_BT = batch['loss_mask'].astype(jnp.float32)
  cfg = model.cfg
  K, R = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
  inv_freq = model.inv_freq()
  graphdef, layers = nnx.split(model.layers)

  def block_stats(carry, layer):
    x_BTD, channels_D = carry
    block = nnx.merge(graphdef, layer)
    a_BTD = block.attn_norm(x_BTD)
    q_BTNH, k_BTKH, v_BTKH = block.attn.project_qkv(a_BTD, positions_BT, inv_freq)
    out_BTNH = attention.xla_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT,
                                       cfg.head_dim ** -0.5)
    B, T = out_BTNH.shape[:2]
    out_BTKRH = out_BTNH.reshape(B, T, K, R, cfg.head_dim)
    o_KRHD = block.attn.o_NHD[...].reshape(K, R, cfg.head_dim, cfg.d_model)
    group_BTKD = jnp.einsum('BTKRH,KRHD->BTKD', out_BTKRH, o_KRHD.astype(out_BTKRH.dtype))
    h_BTD = x_BTD + block.attn.project_out(out_BTNH)
    m_BTD = block.mlp_norm(h_BTD)
    mlp = block.mlp
    gate_BTF = jnp.einsum('BTD,DF->BTF', m_BTD, mlp.gate_DF[...].astype(m_BTD.dtype))
    up_BTF = jnp.einsum('BTD,DF->BTF', m_BTD, mlp.up_DF[...].astype(m_BTD.dtype))
    y_BTD = h_BTD + mlp(m_BTD)
    cos_BT = jnp.sum(x_BTD * y_BTD, -1) / (
        jnp.linalg.norm(x_BTD, axis=-1) * jnp.linalg.norm(y_BTD, axis=-1) + 1e-12)
    stats = dict(groups=_masked_sum(jnp.linalg.norm(group_BTKD, axis=-1), w_BT),
                 neurons=_masked_sum(jnp.abs(jax.nn.silu(gate_BTF) * up_BTF), w_BT),
                 blocks=_masked_sum(1.0 - cos_BT, w_BT, keep_last=0))
    channels_D += _masked_sum(jnp.abs(a_BTD), w_BT) + _masked_sum(jnp.abs(m_BTD), w_BT)
    return (y_BTD, channels_D), stats

  x_BTD = model.embed(batch['inputs'])
  zeros_D = jnp.zeros((cfg.d_model,), jnp.float32)
  (x_BTD, channels_D), stats = jax.lax.scan(block_stats, (x_BTD, zeros_D), layers)
  channels_D += _masked_sum(jnp.abs(model.final_norm(x_BTD)), w_BT)
  return {**stats, 'channels': channels_D, 'tokens': jnp.sum(w_BT)}


def activation_stats(cfg: ModelConfig, params: dict, batches: Iterable[dict]) -> dict[str, np.ndarray]:
  """Mean importance per unit over the target tokens of `batches` (see the module docstring):
  {'neurons' [L, F], 'groups' [L, K], 'channels' [D], 'blocks' [L], 'tokens' (a count)}."""
  model = _model(cfg, params)
  total: dict[str, Any] = {}
  for batch in batches:
    stats = _batch_stats(model, {k: jnp.asarray(v) for k, v in batch.items()})
    total = stats if not total else jax.tree.map(jnp.add, total, stats)
  if not total or float(total['tokens']) == 0:
    raise ValueError('the calibration batches hold no target tokens; give a calibration set with '
                     'a non-empty validation split (--calibration DATA_DIR).')
  tokens = float(total['tokens'])
  return {**{k: np.asarray(v, np.float64) / tokens for k, v in total.items() if k != 'tokens'},
          'tokens': tokens}


def _top(scores: np.ndarray, n: int) -> np.ndarray:
  """Indices of the n largest scores, ascending (ties: the lower index)."""
  return np.sort(np.argsort(-scores, kind='stable')[:n])


def select(stats: dict[str, np.ndarray], sizes: dict) -> Keep:
  """The most important units of each kind, in the original order."""
  layers = _top(stats['blocks'], sizes['num_layers'])
  return Keep(layers=layers,
              groups=np.stack([_top(stats['groups'][i], sizes['num_kv_heads']) for i in layers]),
              neurons=np.stack([_top(stats['neurons'][i], sizes['mlp_dim']) for i in layers]),
              channels=_top(stats['channels'], sizes['d_model']))


def pruned_config(cfg: ModelConfig, keep: Keep) -> ModelConfig:
  R = cfg.num_heads // cfg.num_kv_heads
  return dataclasses.replace(cfg, num_layers=len(keep.layers), num_kv_heads=keep.groups.shape[1],
                             num_heads=keep.groups.shape[1] * R, mlp_dim=keep.neurons.shape[1],
                             d_model=len(keep.channels))


# Which axis of each weight holds which unit, by the weight's name (DESIGN.md dimension letters).
_AXES = {'q_DNH': 'DNH', 'k_DKH': 'DKH', 'v_DKH': 'DKH', 'o_NHD': 'NHD', 'q_NH': 'NH', 'k_KH': 'KH',
         'v_KH': 'KH', 'gate_DF': 'DF', 'up_DF': 'DF', 'down_FD': 'FD'}


def _cut(x: np.ndarray, letters: str, index: dict[str, np.ndarray]) -> np.ndarray:
  for axis, letter in enumerate(letters):
    if letter in index:
      x = np.take(x, index[letter], axis=axis)
  return x


def slice_params(cfg: ModelConfig, params: dict, keep: Keep) -> dict:
  """The params (stacked layers, numpy) of the pruned model `pruned_config(cfg, keep)`."""
  R = cfg.num_heads // cfg.num_kv_heads
  D = {'D': keep.channels}

  def layer(i: int, groups: np.ndarray, neurons: np.ndarray) -> dict:
    heads = (groups[:, None] * R + np.arange(R)[None]).reshape(-1)
    index = {**D, 'N': heads, 'K': groups, 'F': neurons}

    def one(path, x):
      name = path[-1].key
      if name == 'scale':  # a norm: over the model width, or over head_dim (q/k norm: untouched)
        return x if path[-2].key in ('q_norm', 'k_norm') else _cut(x, 'D', D)
      return _cut(x, _AXES[name], index)
    return jax.tree_util.tree_map_with_path(one, jax.tree.map(lambda a: np.asarray(a)[i],
                                                              params['layers']))

  layers = [layer(i, g, n) for i, g, n in zip(keep.layers, keep.groups, keep.neurons)]
  out = {'embed_VD': _cut(np.asarray(params['embed_VD']), 'VD', D),
         'final_norm': {'scale': _cut(np.asarray(params['final_norm']['scale']), 'D', D)},
         'layers': jax.tree.map(lambda *xs: np.stack(xs), *layers)}
  if params.get('lm_head_DV') is not None:
    out['lm_head_DV'] = _cut(np.asarray(params['lm_head_DV']), 'DV', D)
  return out


def zeroed_params(cfg: ModelConfig, params: dict, keep: Keep) -> dict:
  """The original model with every pruned MLP neuron, GQA group and layer zeroed out (a pruned
  layer's output projections zeroed make its block the identity): the reference the pruned model
  must equal. Embedding channels are not covered (see the module docstring)."""
  R = cfg.num_heads // cfg.num_kv_heads
  out = jax.tree.map(lambda a: np.array(a, copy=True), params)
  o_LNHD, down_LFD = out['layers']['attn']['o_NHD'], out['layers']['mlp']['down_FD']
  for i in range(cfg.num_layers):
    if i not in keep.layers:
      o_LNHD[i], down_LFD[i] = 0, 0
      continue
    j = int(np.searchsorted(keep.layers, i))
    dropped_groups = np.setdiff1d(np.arange(cfg.num_kv_heads), keep.groups[j])
    for g in dropped_groups:
      o_LNHD[i, g * R:(g + 1) * R] = 0
    down_LFD[i, np.setdiff1d(np.arange(cfg.mlp_dim), keep.neurons[j])] = 0
  return out
