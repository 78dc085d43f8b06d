"""Int8 weights (per output channel): for serving (W8A8 products) and as QLoRA's frozen base (weight-only).

Weights. Each weight matrix W is stored as int8 q with a float32 scale per output channel:
  scale = max |W| over the input (contracted) axes / 127,   q = round(W / scale),   W ~ q * scale.
Norm scales and biases stay in full precision (they are tiny). The quantized params keep the model's
nnx.State layout; a quantized Variable holds an `Int8(q, scale)` instead of an array, with scale's
contracted axes of size 1 (so it carries the same logical axis names and shards like its weight).
The embedding table is quantized per row (a row is a token's vector, and a channel of the tied LM
head).

Matmuls. The model's products go through models/layers.einsum, which hands an Int8 weight its own
`einsum`: int8 x int8 -> int32 (W8A8). x is rounded per token (x_scale = max |x| over the
contracted axes / 127, computed on the fly), the products summed in int32 (XLA:CPU runs the dot in
YNNPACK; GPUs and TPUs have int8 units) and scaled by x_scale * scale. Weights stay int8 in memory
through the step; the embedding lookup gathers int8 rows and dequantizes only those.
Measured on a 2-core AVX-512 CPU (small preset, 16-row projections as in a decode step): 1.3-2x
the speed of float32 per matmul, decode steps 1.6-1.7x as fast at batch 1 and 16
(benchmarks/int8_decode.py). Weight-only int8 was no faster than float32 there: XLA:CPU fuses an
int8 -> float convert into no dot, so x @ q.astype(f32) and a mixed-type dot_general write each
weight out in float32 first (the LM head 3.4x slower than float32; so did the first version here,
which dequantized a layer before it ran), and a multiply-and-reduce fusion reads int8 but runs up
to 4x slower than the float32 dot. Rounding the activations adds an error of the size of the
weights' own: validation perplexity within 0.02% of full precision on the trained tiny preset
(benchmarks/quantized_serving.py); a model with outlier activation channels (large LLMs) loses
more than it would to weight-only int8.

Why not qwix (Google's JAX quantization library, used by MaxText): qwix 0.1.8 installs with the
pinned jax 0.10.2 and its PTQ provider quantizes this model's params on CPU, but running the
quantized model failed: our layers cast weights to the compute dtype before each einsum
(`w[...].astype(dt)`), which qwix's quantized arrays do not support, and qwix intercepts one method
of an NNX model while the paged forward calls the projections of each layer itself, inside a scan.
Using it would mean rewriting the model's matmuls around qwix; it also has no KV-cache quantization.
The math needed here is a few lines, written out below.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import OutMajor, out_major_letters, weight_einsum

WEIGHT_DTYPES = ('int8',)

# Weight name -> its input (contracted) axes, without the leading layer axis of stacked params.
# The scale has one entry per remaining (output) axis element.
CONTRACTED = {'q_DNH': (0,), 'k_DKH': (0,), 'v_DKH': (0,), 'o_NHD': (0, 1), 'gate_DF': (0,),
              'up_DF': (0,), 'down_FD': (0,), 'lm_head_DV': (0,), 'embed_VD': (1,),
              # Mixture-of-experts weights, per expert and output channel (models/moe.py). The
              # router stays in full precision: it is small and its top-k is a hard decision.
              'gate_EDF': (1,), 'up_EDF': (1,), 'down_EFD': (1,)}


class Int8(NamedTuple):
  """A quantized array: q (int8) times scale (float32, broadcastable to q)."""

  q: jax.Array
  scale: jax.Array

  @property
  def T(self) -> Int8:  # pylint: disable=invalid-name
    return type(self)(self.q.T, self.scale.T)

  def einsum(self, spec: str, x: jax.Array, preferred_element_type=None) -> jax.Array:
    """jnp.einsum(spec, x, q * scale): see the module `einsum`. models/layers.einsum calls it."""
    return einsum(spec, x, self, preferred_element_type)

  def take(self, ids: jax.Array) -> Int8:
    """Entries `ids` of the leading axis (experts), still int8 with their scales."""
    return type(self)(jnp.take(self.q, ids, axis=0), jnp.take(self.scale, ids, axis=0))

  def take_rows(self, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a [V, D] table quantized per row: only those rows are read and dequantized."""
    q_XD = jnp.take(self.q, ids, axis=0)
    scale_X1 = jnp.take(self.scale, ids, axis=0)
    return (q_XD.astype(jnp.float32) * scale_X1).astype(dtype)


class WeightOnly(Int8):
  """Int8 whose products run in x's dtype, the weight widened on the fly: QLoRA's frozen base.
  Unlike Int8.einsum (which rounds x, so no gradient flows through it) it is differentiable in x,
  and exact for the weight it stores: x (q * scale) = (x q) scale, the scale one per output channel."""

  def einsum(self, spec: str, x: jax.Array, preferred_element_type=None) -> jax.Array:
    inputs, out = spec.replace(' ', '').split('->')
    y = weight_einsum(spec, x, self.q.astype(x.dtype), preferred_element_type=preferred_element_type)
    return (y * _expand(self.scale, inputs.split(',')[1], out).astype(y.dtype)).astype(y.dtype)


class Int8OutMajor(Int8):
  """Int8 laid out as models.layers.OutMajor (q and scale with their contracted axes last), whose
  W8A8 products run weight first: the serving engine's int8 weights on CPU from width 768
  (out_major_params; serve/engine_config.py)."""

  @property
  def T(self) -> Int8OutMajor:  # pylint: disable=invalid-name
    return self  # as OutMajor.T: the layout follows the spec

  def einsum(self, spec: str, x: jax.Array, preferred_element_type=None) -> jax.Array:
    return einsum(spec, x, self, preferred_element_type, out_major=True)


def _is_int8(x) -> bool:
  return isinstance(x, Int8)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def quantize(w: jax.Array, axes: tuple[int, ...], kind: type[Int8] = Int8) -> Int8:
  """Symmetric int8 with one scale per index of the axes not in `axes`."""
  w32 = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return kind(q, scale)


def dequantize_array(x: Int8, dtype) -> jax.Array:
  return (x.q.astype(jnp.float32) * x.scale).astype(dtype)


def _expand(a: jax.Array, axes: str, out: str) -> jax.Array:
  """`a` (one dim per letter of `axes`; size 1 where the letter is not in `out`) transposed and
  expanded to broadcast against an array whose dims are the letters of `out`."""
  kept = ''.join(c for c in axes if c in out)
  a = a.reshape([n for c, n in zip(axes, a.shape) if c in out])
  a = jnp.einsum(f'{kept}->{"".join(c for c in out if c in kept)}', a)
  return jnp.expand_dims(a, [i for i, c in enumerate(out) if c not in kept])


def einsum(spec: str, x: jax.Array, w: Int8, preferred_element_type=None,
           out_major: bool = False) -> jax.Array:
  """jnp.einsum(spec, x, w.q * w.scale) (w's scale one per output channel), computed int8 x int8:
  x is quantized per index of its non-contracted axes (per token) and the product summed in int32.
  out_major: w is laid out as Int8OutMajor holds it (contracted axes last; models/layers.OutMajor).

  Returns preferred_element_type, else x's dtype. A single row is padded to two: XLA:CPU hands
  int8 matrix-vector products to no library and would widen all of w to int32 first. Letters in
  x, w and the output are batch dims (the experts of a grouped matmul: 'ECD,EDF->ECF').
  """
  inputs, out = spec.replace(' ', '').split('->')
  x_axes, w_axes = inputs.split(',')
  batch = ''.join(c for c in x_axes if c in w_axes and c in out)
  summed = ''.join(c for c in x_axes if c not in out)
  if not summed or sorted(x_axes + w_axes) != sorted(out + batch + 2 * summed):
    raise ValueError(f'quant.einsum({spec!r}): use one input and one weight whose shared letters '
                     'are all contracted or batch dims of the output (no repeats).')
  if out_major:  # w's letters as it lies
    w_axes = out_major_letters(x_axes, w_axes, out)
  contracted = tuple(i for i, c in enumerate(x_axes) if c not in out)
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=contracted, keepdims=True)
  x_scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  xq = jnp.clip(jnp.round(x32 / x_scale), -127, 127).astype(jnp.int8)
  rows = x.size // max(1, math.prod(x.shape[i] for i in contracted))
  pad = rows == 1 and len(contracted) < len(x_axes)
  if pad:  # along x's first non-contracted axis, sliced off again below
    axis = next(i for i in range(len(x_axes)) if i not in contracted)
    xq = jnp.concatenate([xq, jnp.zeros_like(xq)], axis=axis)
  acc = weight_einsum(spec, xq, w.q, preferred_element_type=jnp.int32, out_major=out_major)
  if pad:
    acc = jax.lax.slice_in_dim(acc, 0, 1, axis=out.index(x_axes[axis]))
  y = acc.astype(jnp.float32) * _expand(x_scale, x_axes, out) * _expand(w.scale, w_axes, out)
  return y.astype(preferred_element_type or x.dtype)


def _contracted(name: str, ndim: int) -> tuple[int, ...]:
  letters = len(name.split('_')[-1])
  return tuple(a + ndim - letters for a in CONTRACTED[name])  # shift past a stacked layer axis


def _name(path) -> str:
  keys = [getattr(k, 'key', None) for k in path]
  return next((k for k in reversed(keys) if isinstance(k, str) and k != 'value'), '')


def map_weights(params: nnx.State, names, fn) -> nnx.State:
  """`params` with each weight array named in `names` replaced by fn(variable, its contracted
  axes), a Variable; weights already held as objects (Int8, OutMajor, LoRA) are left as they are."""
  def one(path, v):
    name = _name(path)
    value = v.get_value()
    if name not in names or hasattr(value, 'einsum'):
      return v
    return fn(v, _contracted(name, value.ndim))
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_variable)


def quantize_params(params: nnx.State, names=tuple(CONTRACTED), kind: type[Int8] = Int8) -> nnx.State:
  """The weight matrices `names` of a Transformer's params as `kind` (jit it to quantize on device)."""
  return map_weights(params, names, lambda v, axes: v.replace(quantize(v.get_value(), axes, kind)))


# The weights out_major_params re-lays: the dense ones (the experts' batched products stay x w).
DENSE = ('q_DNH', 'k_DKH', 'v_DKH', 'o_NHD', 'gate_DF', 'up_DF', 'down_FD', 'lm_head_DV', 'embed_VD')


def out_major_params(params: nnx.State, names=DENSE) -> nnx.State:
  """The weights `names` as models.layers.OutMajor (float) or Int8OutMajor (int8): their contracted
  axes moved last (a copy), the Variables' logical axes reordered alike, so they shard by the same
  names. Serving only: model_layout takes them back."""
  def one(path, v):
    name, value = _name(path), v.get_value()
    if name not in names or (hasattr(value, 'einsum') and type(value) is not Int8):
      return v
    arrays = tuple(value) if type(value) is Int8 else (value,)  # q and scale alike
    order = _out_major_order(len(arrays[0].shape), _contracted(name, len(arrays[0].shape)))
    moved = tuple(jnp.transpose(a, order) for a in arrays)
    return _permuted(v, Int8OutMajor(*moved) if type(value) is Int8 else OutMajor(*moved), order)
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_variable)


def model_layout(params: nnx.State) -> nnx.State:
  """`params` with every OutMajor and Int8OutMajor weight back in the model's layout."""
  def one(path, v):
    value = v.get_value()
    if not isinstance(value, (OutMajor, Int8OutMajor)):
      return v
    arrays = tuple(value)
    order = _out_major_order(arrays[0].ndim, _contracted(_name(path), arrays[0].ndim))
    back = [order.index(a) for a in range(len(order))]
    arrays = tuple(jnp.transpose(a, back) for a in arrays)
    return _permuted(v, Int8(*arrays) if isinstance(value, Int8) else arrays[0], back)
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_variable)


def _out_major_order(ndim: int, contracted: tuple[int, ...]) -> list[int]:
  return [a for a in range(ndim) if a not in contracted] + list(contracted)


def _permuted(v: nnx.Variable, value, order: list[int]) -> nnx.Variable:
  """v holding `value`, its logical axis names permuted by `order` as the array's axes were."""
  names = v.get_metadata().get('out_sharding')
  return v.replace(value, **({'out_sharding': tuple(names[a] for a in order)} if names else {}))


def dequantize(params, dtype):
  """Every Int8 in `params` (a State, or any pytree) as an array of `dtype`; the rest unchanged."""
  return jax.tree.map(lambda x: dequantize_array(x, dtype) if _is_int8(x) else x, params,
                      is_leaf=_is_int8)


def abstract(abstract_params: nnx.State) -> nnx.State:
  """The ShapeDtypeStructs quantize_params produces from these."""
  return jax.eval_shape(quantize_params, abstract_params)


def nbytes(params) -> int:
  """Bytes of every array in `params` (q and scales included)."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
