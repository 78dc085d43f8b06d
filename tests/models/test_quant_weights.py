"""models/quant.py's WeightOnly (QLoRA's int8 base): its product and the gradient through it equal
those of the float weight it stores (q * scale), for every spec the decoder uses, experts included.
The serving engine's OutMajor weights (models/layers.py): the same products, computed weight first.
(The W8A8 Int8 product, the int8 KV cache and serving: tests/serve/test_quant.py.)"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from models import presets, quant, transformer
from models.layers import OutMajor

SPECS = [('BTD,DNH->BTNH', (2, 3, 8), (8, 4, 5), (0,)), ('BTNH,NHD->BTD', (2, 3, 4, 5), (4, 5, 8), (0, 1)),
         ('ECD,EDF->ECF', (3, 4, 8), (3, 8, 6), (1,))]


@pytest.mark.parametrize('spec,x_shape,w_shape,contracted', SPECS)
def test_weight_only_is_the_stored_weight_in_value_and_gradient(spec, x_shape, w_shape, contracted):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, x_shape)
  w = quant.quantize(jax.random.normal(kw, w_shape), contracted, quant.WeightOnly)
  assert isinstance(w, quant.WeightOnly) and w.q.dtype == jnp.int8
  dense = np.asarray(w.q, np.float64) * np.asarray(w.scale, np.float64)  # the weight it stores
  y = w.einsum(spec, x)
  np.testing.assert_allclose(y, np.einsum(spec, np.asarray(x, np.float64), dense), rtol=1e-5, atol=1e-5)
  # d sum(y * c) / dx = einsum of c with the weight: what flows to the layers below.
  c = jax.random.normal(jax.random.key(2), y.shape)
  grad = jax.grad(lambda x: jnp.sum(w.einsum(spec, x) * c))(x)
  ref = jax.grad(lambda x: jnp.sum(jnp.einsum(spec, x, jnp.asarray(dense, jnp.float32)) * c))(x)
  np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(grad).max()) > 0.1
  # Int8's W8A8 product rounds x: its gradient reaches x only through each row's max (the scale),
  # one entry per row, so it cannot train the layers below.
  int8 = quant.Int8(w.q, w.scale)
  g8 = jax.grad(lambda x: jnp.sum(int8.einsum(spec, x) * c))(x)
  rows = x.size // np.prod([x_shape[i] for i in range(len(x_shape)) if spec[i] not in spec.split('->')[1]])
  assert np.count_nonzero(np.asarray(g8)) == rows


@pytest.mark.parametrize('spec,x_shape,w_shape,contracted', SPECS + [('BTD,DV->BTV', (2, 3, 8), (8, 7), (0,))])
def test_out_major_weights_compute_the_same_products(spec, x_shape, w_shape, contracted):
  kx, kw = jax.random.split(jax.random.key(1))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  order = [a for a in range(w.ndim) if a not in contracted] + list(contracted)
  got = OutMajor(jnp.transpose(w, order)).einsum(spec, x)
  want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # int8 (W8A8): the same integer sums, so the same result as Int8 laid out as the model lays it.
  q = quant.quantize(w, contracted)
  moved = quant.Int8OutMajor(*(jnp.transpose(a, order) for a in q))
  np.testing.assert_array_equal(moved.einsum(spec, x), q.einsum(spec, x))


def test_out_major_runs_the_product_weight_first():
  """The product XLA compiles is w^T x^T, an [F, B T] result: without the barrier XLA folds the
  transpose back into the product's layout and runs x w (the slower GEMM on CPU)."""
  B, T, D, F = 2, 4, 64, 96
  x, w = jnp.ones((B, T, D)), jnp.ones((F, D))
  def text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()
  out_major = text(lambda x, t: OutMajor(t).einsum('BTD,DF->BTF', x) + 1, x, w)
  model = text(lambda x, w: jnp.einsum('BTD,DF->BTF', x, w) + 1, x, w.T)
  product = r'f32\[{},{}\]\{{1,0\}} (?:fusion|dot)\('
  assert re.search(product.format(F, B * T), out_major), out_major
  assert re.search(product.format(B * T, F), model), model


def test_out_major_params_round_trip_with_their_axis_names():
  cfg = presets.preset('tiny', num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                       mlp_dim=48, vocab_size=64)
  state = nnx.state(transformer.Transformer(cfg, nnx.Rngs(0)))
  relaid = quant.out_major_params(state)
  q = relaid['layers']['attn']['q_DNH']
  assert isinstance(q.get_value(), OutMajor)
  assert q.get_value().t.shape == (2, 4, 8, 32)  # [L, N, H, D]: the contracted D last
  assert q.get_metadata()['out_sharding'] == ('layers', 'heads', 'head_dim', 'embed')
  for params in (state, quant.quantize_params(state)):
    relaid = quant.out_major_params(params)
    kind = OutMajor if params is state else quant.Int8OutMajor
    assert kind in {type(v.get_value()) for _, v in nnx.to_flat_state(relaid)}
    back = quant.model_layout(relaid)
    for (path, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(back)):
      assert type(a.get_value()) is type(b.get_value()), path
      for x, y in zip(jax.tree.leaves(a.get_value()), jax.tree.leaves(b.get_value())):
        np.testing.assert_array_equal(x, y, err_msg=str(path))
      assert a.get_metadata().get('out_sharding') == b.get_metadata().get('out_sharding'), path
