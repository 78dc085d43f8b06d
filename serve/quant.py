"""Int8 for serving: weight-only int8 (per output channel) and the int8 KV cache (per token, per head).

Weights. Each weight matrix W is stored as int8 q with a float32 scale per output channel:
  scale = max |W| over the input (contracted) axes / 127,   q = round(W / scale),   W ~ q * scale.
Norm scales and biases stay in full precision (they are tiny). The quantized params keep the model's
nnx.State layout; a quantized Variable holds an `Int8(q, scale)` instead of an array, with scale's
contracted axes of size 1 (so it carries the same logical axis names and shards like its weight).
The paged forward dequantizes each layer's weights inside the layer loop, to the compute dtype,
so the full-precision copy of only one layer exists at a time (and XLA may fuse the dequantize into
the matmul). The embedding table is quantized per row (a row is a token's vector, and a channel of
the tied LM head).

KV cache. Keys and values are written as int8 with a float32 scale per (token, kv head):
  scale = max |k| over the head dim / 127. Pages [L, P, G, K, H] int8 + scales [L, P, G, K].

Why not qwix (Google's JAX quantization library, used by MaxText): qwix 0.1.8 installs with the
pinned jax 0.10.2 and its PTQ provider quantizes this model's params on CPU, but running the
quantized model fails: our layers cast weights to the compute dtype before each einsum
(`w[...].astype(dt)`), which qwix's quantized arrays do not support, and qwix intercepts one method
of an NNX model while the paged forward calls the projections of each layer itself, inside a scan.
Using it would mean rewriting the model's matmuls around qwix; it also has no KV-cache quantization.
The math needed here is a few lines, written out below.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from parallelism.rules import DEFAULT_RULES, Rules, logical_to_spec

WEIGHT_DTYPES = ('int8',)

# Weight name -> its input (contracted) axes, without the leading layer axis of stacked params.
# The scale has one entry per remaining (output) axis element.
CONTRACTED = {'q_DNH': (0,), 'k_DKH': (0,), 'v_DKH': (0,), 'o_NHD': (0, 1), 'gate_DF': (0,),
              'up_DF': (0,), 'down_FD': (0,), 'lm_head_DV': (0,), 'embed_VD': (1,)}


class Int8(NamedTuple):
  """A quantized array: q (int8) times scale (float32, broadcastable to q)."""

  q: jax.Array
  scale: jax.Array


def _is_int8(x) -> bool:
  return isinstance(x, Int8)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def quantize(w: jax.Array, axes: tuple[int, ...]) -> Int8:
  """Symmetric int8 with one scale per index of the axes not in `axes`."""
  w32 = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return Int8(q, scale)


def dequantize_array(x: Int8, dtype) -> jax.Array:
  return (x.q.astype(jnp.float32) * x.scale).astype(dtype)


def _contracted(name: str, ndim: int) -> tuple[int, ...]:
  letters = len(name.split('_')[-1])
  return tuple(a + ndim - letters for a in CONTRACTED[name])  # shift past a stacked layer axis


def _name(path) -> str:
  keys = [getattr(k, 'key', None) for k in path]
  return next((k for k in reversed(keys) if isinstance(k, str) and k != 'value'), '')


def quantize_params(params: nnx.State) -> nnx.State:
  """The weight matrices of a Transformer's params as Int8 (jit it to quantize on device)."""
  def one(path, v):
    name = _name(path)
    value = v.get_value()
    if name not in CONTRACTED or _is_int8(value):
      return v
    return v.replace(quantize(value, _contracted(name, value.ndim)))
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_variable)


def is_quantized(params) -> bool:
  return any(_is_int8(x) for x in jax.tree.leaves(params, is_leaf=_is_int8))


def dequantize(params, dtype):
  """Every Int8 in `params` (a State, or any pytree) as an array of `dtype`; the rest unchanged."""
  return jax.tree.map(lambda x: dequantize_array(x, dtype) if _is_int8(x) else x, params,
                      is_leaf=_is_int8)


def abstract(abstract_params: nnx.State) -> nnx.State:
  """The ShapeDtypeStructs quantize_params produces from these."""
  return jax.eval_shape(quantize_params, abstract_params)


def logical_shardings(abstract_quantized: nnx.State, mesh: Mesh,
                      rules: Rules = DEFAULT_RULES) -> nnx.State:
  """Shardings by the Variables' logical axes, for q and scale alike (a size-1 scale axis is
  replicated); parallelism.sharding.logical_shardings, extended to Int8 values."""
  def one(v):
    axes = v.get_metadata().get('out_sharding')

    def spec(x):
      return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules) if axes else
                           jax.sharding.PartitionSpec())
    return v.replace(jax.tree.map(spec, v.get_value()))
  return jax.tree.map(one, abstract_quantized, is_leaf=_is_variable)


def nbytes(params) -> int:
  """Bytes of every array in `params` (q and scales included)."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


# ---- KV cache.

def quantize_kv(x_TKH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(int8 [T, K, H], float32 scales [T, K]): one scale per token and kv head."""
  q = quantize(x_TKH, (2,))
  return q.q, q.scale[..., 0]


def dequantize_kv(q_XGKH: jax.Array, scale_XGK: jax.Array, dtype) -> jax.Array:
  return (q_XGKH.astype(jnp.float32) * scale_XGK[..., None]).astype(dtype)
