"""The MoE MLP (models/moe.py) against numpy references written out token by token."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import moe, presets, transformer
from models.config import ModelConfig

RTOL = ATOL = 1e-5  # float32 products of a few hundred terms of magnitude ~1

CFG = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=24, num_experts=4, experts_per_token=2,
                  load_balance_loss=0.01, router_z_loss=1e-3, dtype='float32')


def _silu(x):
  return x / (1 + np.exp(-x))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize('impl,tile', [('tiled', 8), ('tiled', None), ('ragged_dot', None),
                                       ('megablox', None)])
@pytest.mark.parametrize('sizes', [(5, 0, 17, 3, 0, 1), (0, 0, 26, 0, 0, 0), (1, 2, 3, 4, 5, 6)])
def test_grouped_matmul_equals_per_expert_matmuls(impl, tile, sizes):
  """Uneven loads, empty experts, everything on one expert; rows past the groups are zeros."""
  rng = np.random.default_rng(0)
  X, D, F = 26, 8, 12
  x = rng.standard_normal((X, D)).astype(np.float32)
  w = rng.standard_normal((len(sizes), D, F)).astype(np.float32)
  expected = np.zeros((X, F), np.float32)
  start = 0
  for e, n in enumerate(sizes):
    expected[start:start + n] = x[start:start + n] @ w[e]
    start += n
  got = moe.grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), impl, tile)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_megablox_gradients_equal_the_per_expert_matmuls():
  """Megablox's own VJP (gmm for x, tgmm for w; Pallas interpret mode off TPU) against autodiff of
  per-expert matmuls, an empty expert included."""
  rng = np.random.default_rng(1)
  sizes, D, F = (5, 0, 17, 4), 8, 12
  x = jnp.asarray(rng.standard_normal((sum(sizes), D)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((len(sizes), D, F)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((sum(sizes), F)), jnp.float32)
  starts = np.cumsum((0,) + sizes)

  def reference(x, w):
    return jnp.concatenate([x[starts[e]:starts[e + 1]] @ w[e] for e in range(len(sizes))])

  got = jax.grad(lambda x, w: jnp.sum(moe.grouped_matmul(x, w, jnp.asarray(sizes), 'megablox') * c),
                 argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(reference(x, w) * c), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL)


def test_tile_rows_bounds_the_padding():
  for X, E in ((2048, 8), (64, 4), (100_000, 128), (3, 8)):
    b = moe.tile_rows(X, E)
    assert 8 <= b <= 128 and b & (b - 1) == 0
    assert E * b <= max(X // 2, E * 8), (X, E, b)


def _router_reference(logits, k, router, renormalize):
  if router == 'topk_softmax':
    experts = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
    return _softmax(np.take_along_axis(logits, experts, -1)), experts
  probs = _softmax(logits)
  experts = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  weights = np.take_along_axis(probs, experts, -1)
  return (weights / weights.sum(-1, keepdims=True) if renormalize else weights), experts


@pytest.mark.parametrize('router,renormalize', [('topk_softmax', False), ('softmax_topk', False),
                                                ('softmax_topk', True)])
def test_router_and_aux_losses_equal_numpy(router, renormalize):
  rng = np.random.default_rng(1)
  T, E, k = 40, 6, 2
  logits = rng.standard_normal((T, E)).astype(np.float32) * 2
  weights, experts = moe.route(jnp.asarray(logits), k, router, renormalize)
  ref_w, ref_e = _router_reference(logits, k, router, renormalize)
  np.testing.assert_array_equal(experts, ref_e)
  np.testing.assert_allclose(weights, ref_w, rtol=RTOL, atol=ATOL)
  # Load balance (Switch / HF Mixtral for one layer): E * sum_e f_e P_e.
  f = np.array([(ref_e == e).sum() for e in range(E)]) / T
  lb = E * np.sum(f * _softmax(logits).mean(0))
  np.testing.assert_allclose(moe.load_balance_loss(jnp.asarray(logits), experts), lb, rtol=RTOL)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(moe.router_z_loss(jnp.asarray(logits)), np.mean(lse**2), rtol=RTOL)


def test_load_balance_loss_equals_transformers_mixtral_for_one_layer():
  import torch
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
  logits = np.random.default_rng(4).standard_normal((40, 6)).astype(np.float32)
  _, experts = moe.route(jnp.asarray(logits), 2, 'topk_softmax', False)
  expected = float(load_balancing_loss_func((torch.as_tensor(logits),), 6, 2))
  np.testing.assert_allclose(moe.load_balance_loss(jnp.asarray(logits), experts), expected,
                             rtol=RTOL)


def test_load_balance_loss_is_k_when_balanced():
  T, E, k = 8, 4, 2
  experts = jnp.asarray([[t % E, (t + 1) % E] for t in range(T)])
  assert float(moe.load_balance_loss(jnp.zeros((T, E)), experts)) == pytest.approx(k)


def _layer_reference(layer: moe.MoE, x_TD, capacity=None):
  """Token by token: the k experts' SwiGLU outputs mixed by the router weights. With a capacity,
  each expert serves its first `capacity` assignments in (token, choice) order."""
  cfg = layer.cfg
  p = {n: np.asarray(getattr(layer, n).get_value()) for n in
       ('router_DE', 'gate_EDF', 'up_EDF', 'down_EFD')}
  weights, experts = _router_reference(x_TD @ p['router_DE'], cfg.experts_per_token,
                                       cfg.router, cfg.router_renormalize)
  seen = np.zeros(cfg.num_experts, int)
  y = np.zeros_like(x_TD)
  for t in range(x_TD.shape[0]):
    for j, e in enumerate(experts[t]):
      seen[e] += 1
      if capacity is not None and seen[e] > capacity:
        continue
      h = _silu(x_TD[t] @ p['gate_EDF'][e]) * (x_TD[t] @ p['up_EDF'][e])
      y[t] += weights[t, j] * (h @ p['down_EFD'][e])
  if layer.shared is not None:
    s = layer.shared
    g, u, d = (np.asarray(w.get_value()) for w in (s.gate_DF, s.up_DF, s.down_FD))
    y += (_silu(x_TD @ g) * (x_TD @ u)) @ d
  return y, seen


@pytest.mark.parametrize('overrides', [
    {}, dict(grouped_matmul='ragged_dot'), dict(grouped_matmul='megablox'),
    dict(router='softmax_topk', router_renormalize=True),
    dict(shared_mlp_dim=20), dict(capacity_factor=0.5), dict(capacity_factor=8.0)])
def test_layer_equals_token_by_token_reference(overrides):
  cfg = dataclasses.replace(CFG, **overrides)
  layer = moe.MoE(cfg, nnx.Rngs(2))
  x = np.random.default_rng(3).standard_normal((3, 10, cfg.d_model)).astype(np.float32)
  if cfg.capacity_factor:  # each sequence routes alone, its experts holding cf x an even share
    capacity = int(np.ceil(cfg.capacity_factor * 10 * cfg.experts_per_token / cfg.num_experts))
    rows = [_layer_reference(layer, x[b], capacity) for b in range(3)]
    expected, seen = np.concatenate([r[0] for r in rows]), sum(r[1] for r in rows)
  else:  # dropless: the whole batch at once
    expected, seen = _layer_reference(layer, x.reshape(30, -1))
  y, aux = layer.with_aux(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y).reshape(30, -1), expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(aux['expert_tokens'], seen)
  if cfg.capacity_factor == 0.5:
    assert max(r[1].max() for r in rows) > capacity  # the case drops some assignments


@pytest.mark.parametrize('overrides', [{}, dict(capacity_factor=1.0)])
def test_expert_tokens_count_only_the_valid_tokens(overrides):
  """Serving's padding: routed (the output is unchanged) but not counted as load."""
  cfg = dataclasses.replace(CFG, **overrides)
  layer = moe.MoE(cfg, nnx.Rngs(2))
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 10, cfg.d_model)).astype(np.float32)
  valid = rng.random((2, 10)) < 0.6
  _, experts = _router_reference(x.reshape(20, -1) @ np.asarray(layer.router_DE.get_value()),
                                 cfg.experts_per_token, cfg.router, cfg.router_renormalize)
  y, aux = layer.with_aux(jnp.asarray(x))
  y_valid, aux_valid = layer.with_aux(jnp.asarray(x), jnp.asarray(valid))
  np.testing.assert_array_equal(y_valid, y)
  np.testing.assert_array_equal(aux_valid['expert_tokens'],
                                np.bincount(experts[valid.reshape(-1)].reshape(-1),
                                            minlength=cfg.num_experts))
  np.testing.assert_array_equal(aux['expert_tokens'],
                                np.bincount(experts.reshape(-1), minlength=cfg.num_experts))


def test_transformer_returns_the_layers_router_losses():
  model = transformer.Transformer(CFG, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
  logits, aux = model.forward(tokens)
  np.testing.assert_array_equal(logits, model(tokens))
  assert aux['expert_tokens'].shape == (CFG.num_layers, CFG.num_experts)
  np.testing.assert_array_equal(aux['expert_tokens'].sum(-1), 2 * 12 * CFG.experts_per_token)
  np.testing.assert_allclose(aux['moe_loss'], 0.01 * aux['load_balance'] + 1e-3 * aux['router_z'],
                             rtol=RTOL)
  dense = transformer.Transformer(presets.preset('tiny', num_layers=1), nnx.Rngs(0))
  assert dense.forward(tokens)[1] == {}


@pytest.mark.parametrize('name,total,active', [('mixtral_8x7b', 46.7e9, 12.9e9),
                                               ('qwen3_30b_a3b', 30.5e9, None)])
def test_published_parameter_counts(name, total, active):
  """Totals from the abstract shapes; active from them with each layer's experts cut to k of E.
  Qwen3-30B-A3B's published 3.3B active is two figures; its config gives 3.35B (checked against
  the formula from its config.json's dimensions instead)."""
  cfg = presets.preset(name)
  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))
  leaves = jax.tree.leaves_with_path(nnx.state(abstract))
  created = sum(x.size for _, x in leaves)
  experts = sum(x.size for p, x in leaves if str(p[-2].key).endswith('_EDF') or
                str(p[-2].key).endswith('_EFD'))
  created_active = created - experts * (cfg.num_experts - cfg.experts_per_token) // cfg.num_experts
  assert created == cfg.num_params() and created_active == cfg.num_active_params()
  assert abs(created / total - 1) < 0.01, created
  if active is None:  # 48 layers x (attention, q/k norms, router, 8 experts) + embeddings
    D, F = 2048, 768
    active = 48 * (2048 * 4096 * 2 + 2 * 2048 * 512 + 256 + 2 * D + D * 128 + 8 * 3 * D * F) + (
        2 * 151_936 * D + D)
  assert abs(created_active / active - 1) < 0.01, created_active


def _matmul_params(cfg) -> int:
  """Parameters one token multiplies by, from the abstract shapes: every weight but the norms'
  scales and the embedding table (a gather; the LM head is separate here), expert weights
  counted for k of E experts."""
  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))
  total = 0
  for path, x in jax.tree.leaves_with_path(nnx.state(abstract)):
    name = str(path[-2].key)
    if name in ('scale', 'embed_VD'):
      continue
    expert = name.endswith('_EDF') or name.endswith('_EFD')
    total += x.size * cfg.experts_per_token // cfg.num_experts if expert else x.size
  return total


def test_mfu_counts_the_active_parameters():
  """train/progress.py's MFU numerator is flops_per_token: 6 x the parameters a token multiplies
  by (its k experts and the router, not all E) plus the attention term, which is the dense
  model's (itself checked against XLA's count in tests/train/test_step.py)."""
  T = 128
  moe_cfg = presets.preset('tiny_moe', shared_mlp_dim=64, tie_embeddings=False)
  dense = presets.preset('tiny', tie_embeddings=False)
  attention = dense.flops_per_token(T) - 6 * _matmul_params(dense)
  assert moe_cfg.flops_per_token(T) == 6 * _matmul_params(moe_cfg) + attention
  all_experts = _matmul_params(dataclasses.replace(moe_cfg, experts_per_token=moe_cfg.num_experts))
  assert moe_cfg.flops_per_token(T) < 0.7 * (6 * all_experts + attention)  # not every expert


def test_count_matches_shapes_with_shared_experts():
  cfg = dataclasses.replace(presets.preset('tiny_moe', num_layers=2), shared_mlp_dim=64)
  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract))) == cfg.num_params()


@pytest.mark.parametrize('overrides,message', [
    (dict(experts_per_token=5), 'experts_per_token=5'),
    (dict(experts_per_token=0), 'experts_per_token=0'),
    (dict(router='sigmoid'), 'router='),
    (dict(router_renormalize=True), 'softmax_topk'),
    (dict(grouped_matmul='gmm'), 'grouped_matmul'),
    (dict(capacity_factor=-1.0), 'capacity_factor'),
    (dict(num_experts=0), 'num_experts=0'),
])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CFG, **overrides)
