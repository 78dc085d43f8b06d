"""models/quant.py's WeightOnly (QLoRA's int8 base): its product and the gradient through it equal
those of the float weight it stores (q * scale), for every spec the decoder uses, experts included.
(The W8A8 Int8 product, the int8 KV cache and serving: tests/serve/test_quant.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import quant

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
