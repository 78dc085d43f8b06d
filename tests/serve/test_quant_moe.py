"""Int8 expert weights (serve/quant.py + models/moe.py): the batched int8 product against numpy,
the int8 MoE through the paged forward against the model on the same Int8 params, the engine, and
the engine with its experts split over an expert axis."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import presets, transformer
from parallelism.mesh import MeshConfig, make_mesh
from serve import forward, kv_cache, quant
from serve.engine import Engine, EngineConfig
from serve.sampling import SamplingParams
from tests.serve.paged_batches import G, P, prefill_batch

ATOL = 1e-4  # the paged forward's own tolerance (tests/serve/test_forward.py)


def np_int8_product(spec, x, w: quant.Int8):
  """x rounded per row over its contracted letters, times w's int8 values, scaled back."""
  inputs, out = spec.split('->')
  x_axes, _ = inputs.split(',')
  summed = tuple(i for i, c in enumerate(x_axes) if c not in out)
  x = np.asarray(x, np.float64)
  xs = np.max(np.abs(x), axis=summed, keepdims=True) / 127
  xs = np.where(xs > 0, xs, 1)
  xq = np.clip(np.round(x / xs), -127, 127)
  q, s = np.asarray(w.q, np.float64), np.asarray(w.scale, np.float64)
  return np.einsum(spec, xq * xs, q * s)


@pytest.mark.parametrize('spec,x_shape', [('ECD,EDF->ECF', (4, 3, 16)),
                                          ('nbD,nDF->nbF', (4, 8, 16))])
def test_batched_int8_einsum_matches_numpy(spec, x_shape):
  rng = np.random.default_rng(0)
  w = quant.quantize(jnp.asarray(rng.standard_normal((4, 16, 24)), jnp.float32), (1,))
  x = rng.standard_normal(x_shape).astype(np.float32)
  x[..., :2] *= 8  # an outlier channel sets its row's scale
  got = jax.jit(lambda x, w: w.einsum(spec, x))(x, w)
  want = np_int8_product(spec, x, w)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  with pytest.raises(ValueError, match='shared letters'):
    w.einsum('ECD,EDF->ECDF', jnp.asarray(x))  # nothing contracted


@functools.cache
def moe_model(**overrides):
  cfg = presets.preset('tiny_moe', num_layers=2, d_model=64, vocab_size=256, num_heads=4,
                       num_kv_heads=2, head_dim=16, mlp_dim=32, dtype='float32', **overrides)
  model = transformer.Transformer(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  return cfg, graphdef, params


@pytest.mark.parametrize('overrides', [{}, dict(capacity_factor=2.0)])
def test_int8_experts_through_the_paged_forward(overrides):
  cfg, graphdef, params = moe_model(**overrides)
  qparams = jax.jit(quant.quantize_params)(params)
  mlp = qparams['layers']['mlp']
  assert all(isinstance(mlp[n].get_value(), quant.Int8) for n in ('gate_EDF', 'up_EDF', 'down_EFD'))
  assert not isinstance(mlp['router_DE'].get_value(), quant.Int8)
  seqs = [np.random.default_rng(n).integers(0, cfg.vocab_size, n) for n in (5, 9)]
  model = nnx.merge(graphdef, qparams)
  expected = [np.asarray(model(jnp.asarray(s)[None]))[0, -1] for s in seqs]
  pages = kv_cache.init_pages(kv_cache.KVCacheSpec.for_model(cfg, P, G))
  # The whole prompts in one step: the paged step routes the same tokens as the dense call
  # (capacity mode counts the step's tokens, so only equal token sets compare).
  logits_BV, _ = jax.jit(functools.partial(forward.forward, graphdef))(
      qparams, pages, prefill_batch(seqs))
  for b, e in enumerate(expected):
    if not overrides:
      np.testing.assert_allclose(np.asarray(logits_BV[b]), e, atol=ATOL, rtol=0)
  full = [np.asarray(nnx.merge(graphdef, params)(jnp.asarray(s)[None]))[0, -1] for s in seqs]
  for e, f in zip(expected, full):  # int8 changes the logits by a little, not by nothing
    assert 1e-4 < np.abs(e - f).max() < 0.05 * np.abs(f).max()


def test_engine_serves_int8_experts():
  cfg, _, params = moe_model()
  ecfg = dict(num_pages=32, page_size=4, max_seqs=2, max_pages_per_seq=8, token_budget=16,
              min_bucket=16)
  prompts = [np.random.default_rng(n).integers(0, cfg.vocab_size, n).tolist() for n in (5, 19)]
  int8 = Engine(cfg, params, EngineConfig(**ecfg, weight_dtype='int8'))
  out = int8.generate(prompts, SamplingParams(max_tokens=6))
  assert all(len(o) == 6 for o in out)
  full_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert 0.25 < int8.weight_bytes / full_bytes < 0.32


@pytest.mark.parametrize('ici', [(1, 1, 2, 2), (1, 1, 4, 1)])
def test_engine_splits_experts_over_the_expert_axis(ici):
  """Expert parallelism in serving: the experts' weights split over 'expert' (and their width over
  'tensor'); the greedy output equals the unsharded engine's."""
  cfg, _, params = moe_model()
  ecfg = EngineConfig(num_pages=32, page_size=4, max_seqs=2, max_pages_per_seq=8, token_budget=16,
                      min_bucket=16)
  prompts = [np.random.default_rng(n).integers(0, cfg.vocab_size, n).tolist() for n in (5, 19)]
  want = Engine(cfg, params, ecfg).generate(prompts, SamplingParams(max_tokens=6))
  mesh = make_mesh(MeshConfig(axes=('data', 'fsdp', 'expert', 'tensor'), ici=ici, dcn=(1, 1, 1, 1)),
                   jax.devices()[:int(np.prod(ici))])
  engine = Engine(cfg, params, ecfg, mesh)
  spec = engine.params['layers']['mlp']['gate_EDF'][...].sharding.spec
  assert spec[1] == 'expert' and spec[3] == ('tensor' if ici[3] > 1 else None)
  assert engine.generate(prompts, SamplingParams(max_tokens=6)) == want
