"""The sharded train step: same numbers on every mesh, exact accumulation, skipped non-finite steps."""

import dataclasses
import functools

import jax
import numpy as np

from data.synthetic import SyntheticData
from models import presets
from parallelism.mesh import MeshConfig, make_mesh
from train.config import OptimizerConfig, TrainConfig
from train.optimizer import make_optimizer
from parallelism.sharding import activation_rules
from train.step import (abstract_model, batch_spec, compile_train_step, init_train_state,
                        loss_sums)

MODEL = presets.preset('tiny', num_layers=2, vocab_size=512)
MESHES = {'8x1x1': (8, 1, 1), '2x4x1': (2, 4, 1), '1x2x4': (1, 2, 4), 'one-device': None}


def config(ici=(8, 1, 1), **kw):
  kw = dict(steps=10, batch_size=8, seq_len=32, **kw)
  return TrainConfig(model=MODEL, mesh=MeshConfig(ici=ici or (1, 1, 1)),
                     optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0), **kw)


@functools.cache
def setup(ici, microbatches=1):
  cfg = config(ici, microbatches=microbatches)
  mesh = make_mesh(cfg.mesh, devices=None if ici else jax.devices()[:1])
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  _, shardings = init_train_state(cfg, mesh, tx)
  return cfg, mesh, tx, compile_train_step(cfg, mesh, tx, shardings)


def run(ici, steps=1, microbatches=1, batch_fn=None):
  """Params and per-step metrics after `steps` steps from the same init on the same data."""
  cfg, mesh, tx, step = setup(ici, microbatches)
  state, _ = init_train_state(cfg, mesh, tx)
  spec = batch_spec(cfg, mesh)
  data = SyntheticData(MODEL.vocab_size, cfg.seq_len, cfg.batch_size, seed=1)
  metrics = []
  for i in range(steps):
    host = (batch_fn or data.batch)(i)
    batch = {k: jax.device_put(host[k], s.sharding) for k, s in spec.items()}
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


# Parameters are not compared after an Adam step: for gradients near zero, g / (sqrt(v) + eps)
# turns float32 rounding differences into updates of up to one learning rate. Instead: gradients
# elementwise, and the second step's loss, which depends on the whole first update.


def test_loss_equal_on_every_mesh():
  _, ref_metrics = run(None, steps=2)
  for name, ici in MESHES.items():
    if ici is None:
      continue
    _, metrics = run(ici, steps=2)
    for m, r in zip(metrics, ref_metrics):
      np.testing.assert_allclose(m['loss'], r['loss'], rtol=1e-5, err_msg=name)
      np.testing.assert_allclose(m['grad_norm'], r['grad_norm'], rtol=1e-4, err_msg=name)


def test_gradients_equal_on_every_mesh():
  data = SyntheticData(MODEL.vocab_size, 32, 8, seed=1).batch(0)
  grads = {}
  for name, ici in MESHES.items():
    cfg, mesh, tx, _ = setup(ici)
    state, shardings = init_train_state(cfg, mesh, tx)
    spec = batch_spec(cfg, mesh)
    batch = {k: jax.device_put(data[k], s.sharding) for k, s in spec.items()}
    graphdef, _ = abstract_model(cfg)
    grad_fn = jax.jit(lambda p, b, g=graphdef: jax.grad(loss_sums, has_aux=True)(p, g, b, 0.0)[0],
                      out_shardings=shardings.params)
    with activation_rules(mesh):
      grads[name] = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(
          grad_fn(state.params, batch)))]
  for name, g in grads.items():
    for x, r in zip(g, grads['one-device']):
      np.testing.assert_allclose(x, r, atol=1e-5 * np.abs(r).max(), rtol=1e-4, err_msg=name)


def test_accumulation_equals_one_big_batch():
  _, big = run((8, 1, 1), steps=2, microbatches=1)
  for k, ici in ((2, (1, 2, 4)), (8, None)):
    _, acc = run(ici, steps=2, microbatches=k)
    for a, b in zip(acc, big):
      np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
      np.testing.assert_allclose(a['grad_norm'], b['grad_norm'], rtol=1e-4)
      assert a['tokens'] == b['tokens']


def test_non_finite_step_is_skipped_and_counted():
  data = SyntheticData(MODEL.vocab_size, 32, 8, seed=1)

  def poisoned(i):
    batch = dict(data.batch(i))
    if i == 1:
      batch['loss_mask'] = batch['loss_mask'].copy()
      batch['loss_mask'][0, 0] = np.nan
    return batch

  cfg, mesh, tx, _ = setup((8, 1, 1))
  initial = _params(jax.device_get(init_train_state(cfg, mesh, tx)[0]))
  one, _ = run((8, 1, 1), steps=1)
  two, metrics = run((8, 1, 1), steps=2, batch_fn=poisoned)
  assert [int(m['skipped_steps']) for m in metrics] == [0, 1]
  assert not np.isfinite(metrics[1]['loss'])
  assert int(two.step) == 2
  for p, q, r in zip(_params(two), _params(one), initial):
    np.testing.assert_array_equal(p, q)  # the poisoned step changed nothing
  assert any(not np.array_equal(q, r) for q, r in zip(_params(one), initial))


def test_params_and_optimizer_state_are_sharded_as_the_rules_say():
  cfg, mesh, tx, _ = setup((1, 2, 4))
  state, _ = init_train_state(cfg, mesh, tx)
  L, D, N, K, H, F, V = (MODEL.num_layers, MODEL.d_model, MODEL.num_heads, MODEL.num_kv_heads,
                         MODEL.head_dim, MODEL.mlp_dim, MODEL.vocab_size)
  # Expected per-device blocks, written out by hand: fsdp=2 splits D, tensor=4 splits N/K/F/V.
  expected = {
      ('embed_VD',): (V // 4, D // 2),
      ('layers', 'attn', 'q_DNH'): (L, D // 2, N // 4, H),
      ('layers', 'attn', 'k_DKH'): (L, D // 2, K // 4, H),
      ('layers', 'attn', 'o_NHD'): (L, N // 4, H, D // 2),
      ('layers', 'mlp', 'gate_DF'): (L, D // 2, F // 4),
      ('layers', 'mlp', 'down_FD'): (L, F // 4, D // 2),
      ('layers', 'attn_norm', 'scale'): (L, D // 2),
      ('lm_head_DV',): (D // 2, V // 4),
  }
  adam = state.opt_state.inner_state[1][0]
  for path, block in expected.items():
    for tree in (state.params, adam.mu, adam.nu):
      leaf = tree
      for key in path:
        leaf = leaf[key]
      array = leaf[...]
      assert array.addressable_shards[0].data.shape == block, path
      assert len(array.addressable_shards) == 8
  assert state.step.sharding.is_fully_replicated


def test_flops_formula_matches_xla_cost_analysis():
  """The MFU numerator against XLA's own count for the compiled step (one device, no remat).

  Layers are unrolled here: XLA's cost analysis counts a scan's loop body once, not per layer.
  """
  cfg = dataclasses.replace(config(None), model=dataclasses.replace(MODEL, scan_layers=False))
  mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  _, shardings = init_train_state(cfg, mesh, tx)
  xla_flops = compile_train_step(cfg, mesh, tx, shardings).cost_analysis()['flops']
  formula = cfg.model.flops_per_token(cfg.seq_len) * cfg.tokens_per_step
  assert abs(xla_flops / formula - 1) < 0.05, (xla_flops, formula)
