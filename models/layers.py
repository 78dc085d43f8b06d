"""Building blocks of the decoder: parameters with logical axes, RMSNorm, RoPE, the SwiGLU MLP.

Every product with a weight matrix goes through `einsum` (and the embedding lookup through
`take_rows`), so a weight Variable may hold, instead of an array, an object that computes the
product itself: int8 weights (models/quant.py: Int8, and WeightOnly for QLoRA) do, reading int8 from memory,
and so do the serving engine's OutMajor weights (below), laid out for XLA:CPU's GEMMs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen
from flax import nnx

from models.config import ModelConfig, RopeScaling

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
  """A parameter whose metadata names its logical axes; `parallelism/` maps them to the mesh."""
  assert len(shape) == len(axes), (shape, axes)
  # eager_sharding=False: the model never shards itself; sharding is decided by the caller's
  # jit out_shardings, derived from these names.
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def fan_in_init(fan_in: int):
  """Truncated-normal init with std 1/sqrt(fan_in) (LeCun), as in most Llama trainers."""
  return jax.nn.initializers.truncated_normal(stddev=1.0 / math.sqrt(fan_in))


def einsum(spec: str, x: jax.Array, w, **kwargs) -> jax.Array:
  """jnp.einsum(spec, x, w) with w cast to x's dtype. `w` is a weight's value: an array, or an
  object with an `einsum(spec, x, **kwargs)` method that computes the product itself."""
  if hasattr(w, 'einsum'):
    return w.einsum(spec, x, **kwargs)
  return weight_einsum(spec, x, w.astype(x.dtype), **kwargs)


def weight_einsum(spec: str, x: jax.Array, w: jax.Array, preferred_element_type=None,
                  out_major: bool = False) -> jax.Array:
  """jnp.einsum(spec, x, w) as one dot_general that contracts in the weight's axis order.

  jnp.einsum may list the contracted axes in another order ('BTNH,NHD->BTD' contracts (H, N)), and
  XLA then transposes the whole weight on every call to match: a copy of each layer's o_NHD per
  decode step, 2.4 MB on the small preset. Here the weight is read as it lies ([N H, D] is a
  bitcast of [N, H, D]) and only x, an activation, is ever re-laid. Specs with an axis summed in
  one operand only, or repeated letters, go to jnp.einsum.

  out_major: w is laid out as OutMajor holds it (its spec letters reordered: output axes first,
  contracted axes last), and the product is computed weight first, w x^T, then transposed."""
  inputs, out = spec.replace(' ', '').split('->')
  xs, ws = inputs.split(',')
  if out_major:
    ws = out_major_letters(xs, ws, out)
  if ('.' in spec or len(set(xs)) < len(xs) or len(set(ws)) < len(ws)
      or any(c not in out and c not in ws for c in xs) or any(c not in out and c not in xs for c in ws)):
    return jnp.einsum(f'{xs},{ws}->{out}', x, w, preferred_element_type=preferred_element_type)
  summed = [c for c in ws if c in xs and c not in out]
  batch = [c for c in xs if c in ws and c in out]
  if out_major:
    dims = (([ws.index(c) for c in summed], [xs.index(c) for c in summed]),
            ([ws.index(c) for c in batch], [xs.index(c) for c in batch]))
    # The barrier keeps XLA from folding the transpose into the product's output layout, which
    # would turn it back into x w.
    y = jax.lax.optimization_barrier(
        jax.lax.dot_general(w, x, dims, preferred_element_type=preferred_element_type))
    got = batch + [c for c in ws if c not in xs] + [c for c in xs if c not in ws]
  else:
    dims = (([xs.index(c) for c in summed], [ws.index(c) for c in summed]),
            ([xs.index(c) for c in batch], [ws.index(c) for c in batch]))
    y = jax.lax.dot_general(x, w, dims, preferred_element_type=preferred_element_type)
    got = batch + [c for c in xs if c not in ws] + [c for c in ws if c not in xs]
  return y if ''.join(got) == out else jnp.transpose(y, [got.index(c) for c in out])


def out_major_letters(xs: str, ws: str, out: str) -> str:
  """A weight's spec letters as OutMajor lays it out: output axes first, contracted axes last."""
  return ''.join(sorted(ws, key=lambda c: c in xs and c not in out))  # stable within each group


class OutMajor(NamedTuple):
  """A weight stored with its output axes first and its contracted axes last (q_DNH as [N, H, D]),
  whose products run weight first: y^T = w^T x^T, an [N, T] result transposed to [T, N].

  Why: XLA:CPU's GEMMs (YNNPACK) run a few-row x w at ~100 GFLOP/s, and the same product as w^T x^T
  with w^T laid out [N, K] at ~150: the weight streams along the kernel's long axis. Measured on a
  2-core AVX-512 host, the small preset's projections and LM head at 16 rows: 31.5 -> 20.8 ms; at 4
  rows 19.8 -> 14.5 ms; at one row the same (a matrix-vector product either way); at 256 rows, even.
  The serving engine lays its weights out so on CPU for models of width 768 and up (narrower ones ran
  faster in their own layout: serve/engine_config.py, OUT_MAJOR_MIN_WIDTH); models never build it.

  Which axes are contracted is read from each product's spec, so one array serves a tied embedding
  both ways: as the table (`take_rows`, [V, D]) and as the LM head ('BTD,DV', stored [V, D] too)."""

  t: jax.Array

  @property
  def T(self) -> OutMajor:  # pylint: disable=invalid-name
    return self  # the layout follows the spec (see above); [V, D] and its transpose lie alike

  def einsum(self, spec: str, x: jax.Array, preferred_element_type=None) -> jax.Array:
    return weight_einsum(spec, x, self.t.astype(x.dtype), preferred_element_type, out_major=True)

  def take_rows(self, ids: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.t, ids, axis=0).astype(dtype)


def take_rows(table, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` of a [V, D] table as `dtype`; a table object with `take_rows` gathers itself."""
  if hasattr(table, 'take_rows'):
    return table.take_rows(ids, dtype)
  return jnp.take(table, ids, axis=0).astype(dtype)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Hints an activation's sharding by logical names; a no-op unless rules and a mesh are set."""
  return linen.with_logical_constraint(x, axes)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32 (the Llama reference does the same)."""

  def __init__(self, dim: int, eps: float, axis_name: str, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (axis_name,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (x32 * scale).astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None):
  """Per-pair rotation frequencies [H/2], with Llama-3.1 scaling of the long wavelengths."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates query/key halves (the Hugging Face `rotate_half` layout), in float32."""
  # h: H/2 rotation pairs.
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq[None, None, :]
  cos, sin = jnp.cos(angles_BTh)[:, :, None, :], jnp.sin(angles_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F, pdt = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
    self.gate_DF = param(rngs, fan_in_init(D), (D, F), ('embed', 'mlp'), pdt)
    self.up_DF = param(rngs, fan_in_init(D), (D, F), ('embed', 'mlp'), pdt)
    self.down_FD = param(rngs, fan_in_init(F), (F, D), ('mlp', 'embed'), pdt)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    gate_BTF = einsum('BTD,DF->BTF', x_BTD, self.gate_DF.get_value())
    up_BTF = einsum('BTD,DF->BTF', x_BTD, self.up_DF.get_value())
    h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ('batch', 'length', 'mlp'))
    return einsum('BTF,FD->BTD', h_BTF, self.down_FD.get_value())
