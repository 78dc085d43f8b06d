"""GRPO against numpy and against the analytic policy gradient of a bandit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import grpo, rewards


def test_advantages_match_numpy():
  r = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  expect = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(grpo.advantages(jnp.asarray(r)), expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grpo.advantages(jnp.asarray(r), scale_std=False),
                             r - r.mean(1, keepdims=True), rtol=1e-6, atol=1e-6)
  assert not np.any(grpo.advantages(jnp.ones((2, 4))))  # equal rewards teach nothing


def _bandit(theta, actions, old, adv, **kw):
  """One-token completions: logp of each sampled action under softmax(theta)."""
  logp = jax.nn.log_softmax(theta)[actions][:, None]
  return grpo.loss(logp, old[:, None], adv, jnp.ones_like(logp), **kw)[0]


def test_on_policy_gradient_is_the_policy_gradient():
  rng = np.random.default_rng(1)
  theta = jnp.asarray(rng.normal(size=8), jnp.float32)
  actions = jnp.asarray(rng.integers(0, 8, 32))
  adv = jnp.asarray(rng.normal(size=32), jnp.float32)
  old = jax.nn.log_softmax(theta)[actions]  # the sampler is the policy: ratio 1
  grad = jax.grad(_bandit)(theta, actions, old, adv)
  p = np.asarray(jax.nn.softmax(theta))
  # -1/N sum_i A_i (onehot(a_i) - p): REINFORCE's gradient of -E[A log pi(a)].
  expect = -np.mean([a * (np.eye(8)[i] - p) for i, a in zip(np.asarray(actions), np.asarray(adv))], 0)
  np.testing.assert_allclose(grad, expect, rtol=1e-5, atol=1e-6)


def test_clipping_stops_the_gradient_where_the_ratio_left_its_range():
  theta = jnp.zeros(8)
  actions = jnp.array([0, 1, 2, 3])
  adv = jnp.array([1.0, 1.0, -1.0, -1.0])
  # Ratios 1.5 (A > 0: clipped, no gradient), 0.5 (A > 0: not clipped), 0.5 (A < 0: clipped),
  # 1.5 (A < 0: not clipped) with eps 0.2.
  logp = jax.nn.log_softmax(theta)[actions]
  old = logp - jnp.log(jnp.array([1.5, 0.5, 0.5, 1.5]))
  per_action = jax.jacobian(lambda t: grpo.token_terms(
      jax.nn.log_softmax(t)[actions][:, None], old[:, None], adv)[0][:, 0])(theta)
  p = np.full(8, 1 / 8)
  assert not np.any(per_action[0]) and not np.any(per_action[2])
  np.testing.assert_allclose(per_action[1], 0.5 * (np.eye(8)[1] - p), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(per_action[3], -1.5 * (np.eye(8)[3] - p), rtol=1e-5, atol=1e-7)
  _, clipped, _ = grpo.token_terms(logp[:, None], old[:, None], adv)
  assert np.asarray(clipped)[:, 0].tolist() == [1, 0, 1, 0]


def test_normalisations_and_the_k3_penalty_match_numpy():
  rng = np.random.default_rng(2)
  logp, old, ref = (rng.normal(-2, 0.3, (3, 5)).astype(np.float32) for _ in range(3))
  adv = rng.normal(size=3).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
  ratio = np.exp(logp - old)
  term = np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
  k3 = np.exp(ref - logp) - (ref - logp) - 1
  term = term - 0.1 * k3
  expect = {'sequence': -np.mean((term * mask).sum(1) / mask.sum(1)),
            'token': -(term * mask).sum() / mask.sum(), 'constant': -(term * mask).sum() / 15}
  for norm, value in expect.items():
    got, metrics = grpo.loss(logp, old, adv, mask, normalisation=norm, ref_BT=ref, beta=0.1)
    np.testing.assert_allclose(got, value, rtol=1e-5)
  np.testing.assert_allclose(metrics['kl'], (k3 * mask).sum() / mask.sum(), rtol=1e-5)
  assert (k3 >= 0).all()
  with pytest.raises(ValueError, match='normalisation'):
    grpo.loss(logp, old, adv, mask, normalisation='mean')


def test_rewards_score_and_survive_a_raising_function():
  rows = [{'answer': 46}, {'answer': 7}, {}]
  fns = rewards.resolve(['exact_answer', 'answer_format', 'length_penalty'])
  got = rewards.score(fns, rows, [' 46', '7 apples', '12'])
  assert got['exact_answer'].tolist() == [1, 0, 0]  # the third row has no answer: raised, scored 0
  assert got['answer_format'].tolist() == [1, 0, 1]
  assert got['length_penalty'].tolist() == [0, 0, 0]
  assert rewards.length_penalty({}, 'x' * 24) == -0.5
  with pytest.raises(ValueError, match="unknown reward 'nope'"):
    rewards.resolve(['nope'])
