"""The DPO loss and its metrics against a numpy reference written from the paper's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import dpo


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sequence_logprobs_sum_the_masked_target_logprobs():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (3, 5))
  mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
  expect = [sum(_log_softmax(logits[b, t])[targets[b, t]] for t in range(5) if mask[b, t])
            for b in range(3)]
  np.testing.assert_allclose(dpo.sequence_logprobs(logits, targets, mask), expect, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('beta,eps', [(0.1, 0.0), (0.5, 0.2)])
def test_loss_rewards_and_metrics_match_numpy(beta, eps):
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = (rng.normal(-20, 4, 16) for _ in range(4))
  z = beta * ((pc - rc) - (pr - rr))
  log_sigmoid = lambda v: -np.log1p(np.exp(-v))
  expect = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
  loss, chosen, rejected = dpo.losses(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta, eps)
  np.testing.assert_allclose(loss, expect, rtol=1e-5)
  np.testing.assert_allclose(chosen - rejected, z, rtol=1e-5, atol=1e-5)
  m = dpo.metrics(loss, chosen, rejected, jnp.asarray(pc), jnp.asarray(pr))
  assert float(m['reward_accuracy']) == pytest.approx(np.mean(z > 0))
  assert float(m['reward_margin']) == pytest.approx(np.mean(z), rel=1e-5)
  assert float(m['dpo_loss']) == pytest.approx(np.mean(expect), rel=1e-5)


def test_gradient_pushes_chosen_up_and_rejected_down():
  g = jax.grad(lambda c, r: dpo.losses(c, r, jnp.zeros(1), jnp.zeros(1), 0.1)[0].sum(), (0, 1))(
      jnp.zeros(1), jnp.zeros(1))
  assert float(g[0][0]) < 0 < float(g[1][0])  # descending the loss raises log pi(y+), lowers log pi(y-)
  # At z = 0 the slope is beta / 2 per pair: -d loss / d log pi(y+) = beta * sigmoid(-z).
  assert float(g[0][0]) == pytest.approx(-0.05)
