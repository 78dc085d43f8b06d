"""Validation loss: the sharded evaluator against numpy on the unsharded model's logits."""

import math

import jax
import numpy as np
from flax import nnx

from data.synthetic import SyntheticData
from models import presets
from parallelism.mesh import MeshConfig, make_mesh
from train.config import TrainConfig
from train.evaluate import compile_eval_step, evaluate
from train.optimizer import make_optimizer
from train.step import abstract_model, batch_spec, init_train_state


def test_evaluate_matches_numpy_over_padded_batches():
  cfg = TrainConfig(model=presets.preset('tiny', num_layers=1, vocab_size=256),
                    mesh=MeshConfig(ici=(2, 2, 2)), batch_size=8, seq_len=16)
  mesh = make_mesh(cfg.mesh)
  state, shardings = init_train_state(cfg, mesh, make_optimizer(cfg.optimizer, cfg.steps))
  data = SyntheticData(256, 16, 8, seed=5)
  batches = [data.batch(0), data.batch(1)]
  batches[1]['loss_mask'][4:] = 0  # a padded last batch: rows 4..7 carry no targets
  step = compile_eval_step(cfg, mesh, shardings.params)
  spec = {k: v.sharding for k, v in batch_spec(cfg, mesh).items()}
  got = evaluate(step, state.params, iter(batches), spec)

  graphdef, _ = abstract_model(cfg)
  model = nnx.merge(graphdef, jax.device_get(state.params))
  nll = tokens = 0.0
  for b in batches:
    logits = np.asarray(model(b['inputs'], b['positions'], b['segment_ids']), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, b['targets'][..., None], -1)[..., 0]
    nll -= (picked * b['loss_mask']).sum()
    tokens += b['loss_mask'].sum()
  assert got['val_tokens'] == tokens
  np.testing.assert_allclose(got['val_loss'], nll / tokens, rtol=1e-5)
  np.testing.assert_allclose(got['val_perplexity'], math.exp(nll / tokens), rtol=1e-4)
  # max_batches stops early.
  assert evaluate(step, state.params, iter(batches), spec, max_batches=1)['val_tokens'] == (
      batches[0]['loss_mask'].sum())
