"""Mixtures of experts over the 'expert' mesh axis: the same objective and gradients on every mesh,
and the router's terms in the train step's objective and metrics."""

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from data.synthetic import SyntheticData
from flax import nnx
from models import moe, presets
from parallelism.mesh import MeshConfig, make_mesh
from parallelism.rules import logical_to_spec
from parallelism.sharding import activation_rules, batch_sharding, logical_shardings
from train.config import OptimizerConfig, TrainConfig
from train.optimizer import make_optimizer
from train.step import (abstract_model, batch_spec, compile_train_step, init_train_state,
                        objective_sums)

AXES = ('data', 'fsdp', 'expert', 'tensor')
MODEL = presets.preset('tiny_moe', num_layers=1, vocab_size=128, d_model=32, num_heads=4,
                       num_kv_heads=2, head_dim=8, mlp_dim=16, dtype='float32')
# data x fsdp x expert x tensor
MESHES = {'expert2': (1, 1, 2, 1), 'expert4': (1, 1, 4, 1), 'expert8': (1, 1, 8, 1),
          'data2-expert2-tensor2': (2, 1, 2, 2), 'expert4-tensor2': (1, 1, 4, 2),
          'fsdp2-expert4': (1, 2, 4, 1)}


def config(ici, **kw):
  return TrainConfig(model=kw.pop('model', MODEL),
                     mesh=MeshConfig(axes=AXES, ici=ici, dcn=(1, 1, 1, 1)), steps=10,
                     batch_size=8, seq_len=16,
                     optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0), **kw)


@functools.cache
def objective_and_grads(ici, capacity_factor=0.0):
  model = dataclasses.replace(MODEL, capacity_factor=capacity_factor)
  cfg = config(ici, model=model)
  mesh = make_mesh(cfg.mesh, jax.devices()[:int(np.prod(ici))])
  state, shardings = init_train_state(cfg, mesh, make_optimizer(cfg.optimizer, cfg.steps))
  spec = batch_spec(cfg, mesh)
  data = SyntheticData(MODEL.vocab_size, cfg.seq_len, cfg.batch_size, seed=1).batch(0)
  batch = {k: jax.device_put(data[k], s.sharding) for k, s in spec.items()}
  graphdef, _ = abstract_model(cfg)
  fn = jax.jit(lambda p, b: jax.value_and_grad(objective_sums, has_aux=True)(p, graphdef, b, cfg),
               out_shardings=((None, None), shardings.params))
  with activation_rules(mesh):
    (objective, sums), grads = fn(state.params, batch)
  return float(objective), jax.device_get(sums), [np.asarray(g) for g in
                                                  jax.tree.leaves(jax.device_get(grads))]


def test_experts_are_split_over_the_expert_axis():
  mesh = make_mesh(MeshConfig(axes=AXES, ici=(1, 2, 4, 1), dcn=(1, 1, 1, 1)))
  spec = logical_to_spec(('expert', 'embed', 'mlp'), (8, 32, 16), mesh)
  assert tuple(spec) == ('expert', 'fsdp', None)
  assert NamedSharding(mesh, spec).shard_shape((8, 32, 16)) == (2, 16, 16)


@pytest.mark.parametrize('name', list(MESHES))
def test_objective_and_gradients_equal_on_every_mesh(name):
  ref_objective, ref_sums, ref_grads = objective_and_grads((1, 1, 1, 1))
  objective, sums, grads = objective_and_grads(MESHES[name])
  np.testing.assert_allclose(objective, ref_objective, rtol=1e-5)
  np.testing.assert_array_equal(sums['expert_tokens_LE'], ref_sums['expert_tokens_LE'])
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5 * np.abs(r).max(), rtol=1e-4, err_msg=name)


def test_capacity_mode_on_the_expert_axis():
  ref_objective, _, ref_grads = objective_and_grads((1, 1, 1, 1), 1.0)
  objective, _, grads = objective_and_grads((2, 1, 4, 1), 1.0)
  np.testing.assert_allclose(objective, ref_objective, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5 * np.abs(r).max(), rtol=1e-4)


@pytest.mark.parametrize('capacity_factor', [0.0, 1.0])
def test_capacity_mode_dispatches_by_all_to_all_and_dropless_gathers(capacity_factor):
  """What the partitioner makes of an MoE layer on data 2 x expert 4 (compiled HLO): with a capacity,
  each sequence's expert slots go to their experts' devices and back by two all-to-alls and every
  expert runs where its weights live; dropless (one sort over the whole batch, whose group sizes
  only a ragged all-to-all could carry, which XLA:CPU lacks) gathers the tokens instead."""
  model = dataclasses.replace(MODEL, capacity_factor=capacity_factor)
  mesh = make_mesh(MeshConfig(axes=AXES, ici=(2, 1, 4, 1), dcn=(1, 1, 1, 1)))
  layer = moe.MoE(model, nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  state = jax.device_put(state, logical_shardings(state, mesh))
  x = jax.device_put(np.zeros((8, 16, model.d_model), np.float32), batch_sharding(mesh, 3))
  with activation_rules(mesh):
    hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile().as_text()
  ops = lambda op: re.findall(rf'= (\([^)]*\)|\S+) {op}(?:-start)?\(', hlo)  # result shapes
  E, D, F = model.num_experts, model.d_model, model.expert_mlp_dim
  expert_weights = [s for s in ops('all-gather') if s.split('{')[0] in (f'f32[{E},{D},{F}]', f'f32[{E},{F},{D}]')]
  assert not expert_weights  # no expert's weights are gathered: tokens move, not weights
  if capacity_factor:
    assert len(ops('all-to-all')) == 2
  else:
    assert not ops('all-to-all') and ops('all-gather')


def test_router_losses_join_the_objective_and_the_metrics():
  """The objective is the token-summed cross-entropy plus tokens x the weighted router losses;
  the step reports the router loss per token and the busiest/idlest expert's load vs the mean
  (with microbatches, each microbatch's router losses, weighted by its tokens)."""
  objective, sums, _ = objective_and_grads((1, 1, 1, 1))
  no_aux = dataclasses.replace(MODEL, load_balance_loss=0.0, router_z_loss=0.0)
  cfg = config((1, 1, 1, 1), model=no_aux)
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  state, _ = init_train_state(cfg, mesh, make_optimizer(cfg.optimizer, cfg.steps))
  data = SyntheticData(MODEL.vocab_size, cfg.seq_len, cfg.batch_size, seed=1).batch(0)
  plain, plain_sums = objective_sums(state.params, abstract_model(cfg)[0], data, cfg)
  assert float(plain_sums['moe_loss']) == 0.0
  np.testing.assert_allclose(objective, float(plain) + float(sums['moe_loss']), rtol=1e-6)
  assert float(sums['moe_loss']) > 0

  cfg = config((2, 1, 2, 2), microbatches=2)
  mesh = make_mesh(cfg.mesh)
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  state, shardings = init_train_state(cfg, mesh, tx)
  batch = {k: jax.device_put(data[k], s.sharding) for k, s in batch_spec(cfg, mesh).items()}
  graphdef = abstract_model(cfg)[0]
  micro = [objective_sums(state.params, graphdef, {k: v[i::2] for k, v in data.items()}, cfg)[1]
           for i in range(2)]
  _, metrics = compile_train_step(cfg, mesh, tx, shardings)(state, batch)  # donates the state
  load = sums['expert_tokens_LE'] / sums['expert_tokens_LE'].mean(-1, keepdims=True)
  np.testing.assert_allclose(metrics['expert_load_max'], load.max(), rtol=1e-6)
  np.testing.assert_allclose(metrics['expert_load_min'], load.min(), rtol=1e-6)
  expected = sum(float(m['moe_loss']) for m in micro) / sum(float(m['tokens']) for m in micro)
  np.testing.assert_allclose(metrics['moe_loss'], expected, rtol=1e-5)
