"""Sampling against a numpy reference of the top-k/top-p support, and seed determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve import sampling
from serve.sampling import SamplingBatch, SamplingParams

V = 12


def support_reference(logits, temperature, top_k, top_p):
  """The tokens a request may draw: rank by (logit desc, id asc), cut at k, then at mass p."""
  x = np.asarray(logits, np.float64) / (temperature if temperature > 0 else 1.0)
  ranked = sorted(range(len(x)), key=lambda i: (-x[i], i))
  if top_k > 0:
    ranked = ranked[:top_k]
  if top_p >= 1:
    return set(ranked)
  probs = np.exp(x[ranked] - x[ranked].max())
  probs /= probs.sum()
  kept, mass = [], 0.0
  for token, prob in zip(ranked, probs):
    kept.append(token)
    mass += prob
    if mass >= top_p:
      break
  return set(kept)


_filter = jax.jit(sampling.filter_logits)
_sample = jax.jit(sampling.sample)


def test_support_matches_reference_with_ties():
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(64):
    logits = np.round(rng.standard_normal(V) * 2, 0)  # coarse values: many ties
    rows.append((logits, rng.choice([0.0, 0.5, 1.0, 1.7]), int(rng.choice([0, 1, 2, 5, V, V + 3])),
                 float(rng.choice([1.0, 0.95, 0.6, 0.3, 0.01]))))
  logits_BV = np.stack([r[0] for r in rows]).astype(np.float32)
  temperature, top_k, top_p = (np.array([r[i] for r in rows]) for i in (1, 2, 3))
  got = np.asarray(_filter(logits_BV, temperature.astype(np.float32), top_k.astype(np.int32),
                           top_p.astype(np.float32)))
  for b, (logits, t, k, p) in enumerate(rows):
    assert set(np.flatnonzero(np.isfinite(got[b]))) == support_reference(logits, t, k, p), (
        b, logits, t, k, p)


def _batch(n, temperature=1.0, top_k=0, top_p=1.0, seeds=None, positions=None):
  seeds = np.zeros(n, np.uint32) if seeds is None else np.asarray(seeds, np.uint32)
  positions = np.arange(n, dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
  return SamplingBatch(np.full(n, temperature, np.float32), np.full(n, top_k, np.int32),
                       np.full(n, top_p, np.float32), seeds, positions)


@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8),
                                                     (1.0, 5, 0.7)])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
  """4096 draws (positions 0..4095 of one seed): only support tokens, frequencies within 5 sigma."""
  logits_V = np.random.default_rng(1).standard_normal(V).astype(np.float32)
  n = 4096
  tokens = np.asarray(_sample(np.tile(logits_V, (n, 1)), _batch(n, temperature, top_k, top_p)))
  support = sorted(support_reference(logits_V, temperature, top_k, top_p))
  assert set(tokens) <= set(support)
  x = logits_V[support].astype(np.float64) / temperature
  probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
  freq = np.array([(tokens == t).sum() for t in support]) / n
  np.testing.assert_array_less(np.abs(freq - probs), 5 * np.sqrt(probs * (1 - probs) / n) + 1e-9)


@pytest.mark.parametrize('vocab', [1, 14, 100, 4096, 5000])
def test_inverse_cdf_matches_an_exact_one_and_never_draws_a_zero_weight(vocab):
  """The two-level draw against float64 cumsum + searchsorted on the same uniforms (they may part
  only where float32 rounding moves a boundary), zero-weight tokens never drawn, even at u = 0 and
  just below 1 with zeros on both ends and whole blocks of zeros."""
  rng = np.random.default_rng(vocab)
  w_V = (rng.random(vocab) ** 3).astype(np.float32)
  w_V[rng.random(vocab) < 0.3] = 0
  w_V[:vocab // 4] = 0
  w_V[-1] = 0 if vocab > 1 else 1
  w_V[max(0, vocab // 2 - 1)] += 0.5
  u_N = np.concatenate([[0.0, np.nextafter(np.float32(1), np.float32(0))],
                        rng.random(20_000)]).astype(np.float32)
  got = np.asarray(jax.jit(sampling.inverse_cdf)(u_N, np.tile(w_V, (len(u_N), 1))))
  cdf = np.cumsum(w_V.astype(np.float64))
  want = np.minimum(np.searchsorted(cdf, u_N.astype(np.float64) * cdf[-1], side='right'), vocab - 1)
  assert (w_V[got] > 0).all()
  assert (got != want).sum() <= 2
  assert got[0] == np.flatnonzero(w_V)[0] and got[1] == np.flatnonzero(w_V)[-1]


def test_greedy_is_argmax():
  logits_BV = np.random.default_rng(2).standard_normal((8, V)).astype(np.float32)
  logits_BV[3, [2, 7]] = 9.0  # a tie: the lower id wins
  got = np.asarray(_sample(logits_BV, _batch(8, temperature=0.0)))
  np.testing.assert_array_equal(got, np.argmax(logits_BV, axis=-1))
  assert got[3] == 2


def test_argmax_equals_numpys_with_ties_infinities_and_nans():
  x = np.random.default_rng(3).standard_normal((9, 300)).astype(np.float32)
  x[1, [5, 40, 299]] = 7.0  # ties: the first
  x[2] = -np.inf  # all -inf: index 0
  x[3, [10, 20]] = np.inf
  x[4, [50, 60]] = np.nan  # numpy and jnp.argmax: the first NaN
  x[5, 0] = x[5].max() + 1
  x[6, -1] = x[6].max() + 1
  x[7] = 0.0
  np.testing.assert_array_equal(np.asarray(jax.jit(sampling.argmax)(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_a_requests_draws_do_not_depend_on_the_batch():
  """Row (seed 5, position p) gives the same token alone, in any row, among any neighbours."""
  rng = np.random.default_rng(3)
  mine = rng.standard_normal(V).astype(np.float32)
  alone = [int(_sample(mine[None], _batch(1, seeds=[5], positions=[p]))[0]) for p in range(6)]
  assert len(set(alone)) > 1, 'positions should change the key'
  for p in range(6):
    others = rng.standard_normal((5, V)).astype(np.float32)
    row = p % 5
    logits = np.insert(others, row, mine, axis=0)
    seeds = rng.integers(0, 2 ** 32, 6).astype(np.uint32)
    positions = rng.integers(0, 100, 6).astype(np.int32)
    seeds[row], positions[row] = 5, p
    batch = _batch(6, seeds=seeds, positions=positions)
    # Neighbours that filter (p % 3 == 1) or are greedy (p % 3 == 2) send the batch down other
    # code paths; the row must not care.
    if p % 3 == 1:
      batch = batch._replace(top_k_B=np.full(6, 3, np.int32))
      batch.top_k_B[row] = 0
    elif p % 3 == 2:
      batch = batch._replace(temperature_B=np.zeros(6, np.float32))
      batch.temperature_B[row] = 1.0
    got = _sample(logits, batch)
    assert int(got[row]) == alone[p]
  other_seed = [int(_sample(mine[None], _batch(1, seeds=[6], positions=[p]))[0]) for p in range(6)]
  assert other_seed != alone


@pytest.mark.parametrize('kwargs,match', [
    (dict(max_tokens=0), 'max_tokens'), (dict(temperature=-1.0), 'temperature'),
    (dict(top_k=-2), 'top_k'), (dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'),
    (dict(seed=-1), 'seed'), (dict(stop=('',)), 'stop')])
def test_params_are_validated(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_host_batch_pads_with_greedy_rows():
  batch = sampling.host_batch([(SamplingParams(temperature=0.5, top_k=3, top_p=0.9), 11, 7)], 3)
  np.testing.assert_array_equal(batch.temperature_B, [0.5, 0, 0])
  np.testing.assert_array_equal(batch.top_k_B, [3, 0, 0])
  np.testing.assert_allclose(batch.top_p_B, [0.9, 1, 1])
  np.testing.assert_array_equal(batch.seeds_B, [11, 0, 0])
  np.testing.assert_array_equal(batch.positions_B, [7, 0, 0])
