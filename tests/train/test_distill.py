"""The distillation loss against a numpy reference, and its fixed point: a student equal to its
teacher has KL 0 and no gradient from the KL term. Teachers of another vocabulary are refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import transformer
from models.config import ModelConfig
from train import distill
from train.config import DistillConfig, TrainConfig

ATOL = 1e-5  # float32 log-softmax of logits of magnitude ~3, summed over 11 entries


def reference_kl(teacher, student, temperature, top_k):
  """KL(p || q) in float64 numpy: p, q the softmaxes at `temperature`, over the teacher's top k."""
  t, s = teacher.astype(np.float64) / temperature, student.astype(np.float64) / temperature
  if top_k:
    ids = np.argsort(-t, axis=-1, kind='stable')[..., :top_k]
    t, s = np.take_along_axis(t, ids, -1), np.take_along_axis(s, ids, -1)
  log_p = t - np.log(np.sum(np.exp(t), -1, keepdims=True))
  log_q = s - np.log(np.sum(np.exp(s), -1, keepdims=True))
  return np.sum(np.exp(log_p) * (log_p - log_q), -1)


@pytest.mark.parametrize('temperature,top_k', [(1.0, 0), (2.0, 0), (1.0, 4), (0.5, 3)])
def test_loss_equals_the_numpy_reference(temperature, top_k):
  rng = np.random.default_rng(int(temperature * 10) + top_k)
  teacher, student = (rng.normal(0, 3, (2, 5, 11)).astype(np.float32) for _ in range(2))
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  got = distill.kl_BT(jnp.asarray(teacher), jnp.asarray(student), temperature, top_k)
  want = reference_kl(teacher, student, temperature, top_k)
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)

  cfg = DistillConfig(teacher='t', alpha=0.3, temperature=temperature, top_k=top_k)
  kl = distill.kl_sum(jnp.asarray(teacher), jnp.asarray(student), jnp.asarray(mask), cfg)
  np.testing.assert_allclose(float(kl), np.sum(want * mask), atol=ATOL * 10, rtol=0)
  ce = 7.0
  want_objective = 0.3 * temperature ** 2 * np.sum(want * mask) + 0.7 * ce
  np.testing.assert_allclose(float(distill.objective(jnp.float32(ce), kl, cfg)), want_objective,
                             atol=ATOL * 10, rtol=0)


@pytest.mark.parametrize('top_k', [0, 5])
def test_a_copy_of_the_teacher_has_kl_zero_and_no_gradient_from_it(top_k):
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64)
  graphdef, params = nnx.split(transformer.Transformer(cfg, nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
  batch = {'inputs': tokens, 'positions': jnp.broadcast_to(jnp.arange(12), (2, 12)),
           'segment_ids': jnp.ones_like(tokens)}
  weights = jnp.ones((2, 12), jnp.float32)
  dcfg = DistillConfig(teacher='t', temperature=2.0, top_k=top_k)

  def kl_of(student_params):
    student = nnx.merge(graphdef, student_params)
    logits = student(batch['inputs'], batch['positions'], batch['segment_ids'])
    return distill.kl_sum(distill.teacher_logits(graphdef, params, batch), logits, weights, dcfg)

  kl, grads = jax.value_and_grad(kl_of)(params)
  assert abs(float(kl)) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6
  # The teacher is frozen: a perturbed student gets a gradient, the teacher's params none.
  moved = jax.tree.map(lambda p: p * 1.01, params)
  assert float(kl_of(moved)) > 1e-6
  teacher_grads = jax.grad(lambda tp: jnp.sum(distill.teacher_logits(graphdef, tp, batch)))(params)
  assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(teacher_grads))


def _tokenizer(path, words):
  with open(path, 'w') as f:
    json.dump({'model': {'type': 'WordLevel', 'vocab': {w: i for i, w in enumerate(words)}},
               'added_tokens': []}, f)
  return str(path)


def test_a_teacher_of_another_vocabulary_or_tokenizer_is_refused(tmp_path):
  student = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=16, mlp_dim=64)
  cfg = TrainConfig(model=student, distill=DistillConfig(teacher='W'))
  with pytest.raises(ValueError, match="distill.teacher='W' has vocab_size 128, the student 64"):
    distill.check_teacher(cfg, ModelConfig(**{**student.__dict__, 'vocab_size': 128}), None, None)
  a = _tokenizer(tmp_path / 'a.json', [f'w{i}' for i in range(64)])
  b = _tokenizer(tmp_path / 'b.json', [f'v{i}' for i in range(64)])
  with pytest.raises(ValueError, match='trained with the tokenizer .*b.json, the student with another'):
    distill.check_teacher(cfg, student, a, b)
  distill.check_teacher(cfg, student, a, _tokenizer(tmp_path / 'c.json', [f'w{i}' for i in range(64)]))


@pytest.mark.parametrize('bad', [dict(alpha=1.5), dict(temperature=0.0), dict(top_k=-1)])
def test_bad_settings_are_refused(bad):
  with pytest.raises(ValueError, match='distill: need 0 <= alpha <= 1'):
    DistillConfig(teacher='t', **bad)
