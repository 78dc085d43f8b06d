"""Speculative verification (serve/speculative.py) against independent references.

Exact in distribution (acceptance 2): a tiny target with a 16-token vocabulary and a deliberately bad
drafter (another model, sharpened; or a point-mass drafter proposing fixed tokens) generate 20,000
continuations of 3 tokens through `verify`, round after round as the engine does; the joint
distribution of tokens (1, 2) and the marginal of token 3 must pass a chi-squared test (p > 0.001)
against the target's exact distribution, enumerated in numpy with a numpy top-p filter, at
temperature 1 and with top-p 0.9; then the same through the engine with a draft model (its steps,
the q gather, verification slots, seeds, rollback), which fails if q comes from the wrong draft
position. Prompt lookup is checked against a brute-force search.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from models import presets, transformer
from serve import sampling, speculative

V, PROMPT, K, N = 16, (3, 7), 2, 20_000
VERIFY = jax.jit(speculative.verify)
TINY = presets.preset('tiny', num_layers=1, d_model=16, vocab_size=V, num_heads=2, num_kv_heads=1,
                      head_dim=8, mlp_dim=32, dtype='float32')


@functools.cache
def _models():
  target = transformer.Transformer(TINY, nnx.Rngs(1))
  drafter = transformer.Transformer(TINY, nnx.Rngs(2))
  graphdef, tp = nnx.split(target)
  _, dp = nnx.split(drafter)

  @jax.jit
  def logits(params, ids_NL, scale):
    return scale * nnx.merge(graphdef, params)(ids_NL).astype(jnp.float32)

  return (lambda ids: logits(tp, ids, 1.0)), (lambda ids: logits(dp, ids, 4.0))  # the drafter: sharpened


def np_filtered_probs(logits_V, temperature, top_p):
  """numpy reference: softmax(logits / T), then keep the likeliest tokens until their mass reaches top_p."""
  z = logits_V.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind='stable')
  before = np.cumsum(p[order]) - p[order]
  keep = np.zeros(V, bool)
  keep[order] = before < top_p if top_p < 1 else True
  p = np.where(keep, p, 0)
  return p / p.sum()


def exact_distribution(temperature, top_p):
  """The target's joint distribution of tokens 1, 2 [V, V] and marginal of token 3 [V], by enumeration."""
  target, _ = _models()
  p1 = np_filtered_probs(np.asarray(target(jnp.array([PROMPT])))[0, -1], temperature, top_p)
  seqs = np.array([PROMPT + (a,) for a in range(V)])
  l2 = np.asarray(target(jnp.asarray(seqs)))[:, -1]
  p12 = p1[:, None] * np.stack([np_filtered_probs(l, temperature, top_p) for l in l2])
  seqs3 = np.array([PROMPT + (a, b) for a in range(V) for b in range(V)])
  l3 = np.asarray(target(jnp.asarray(seqs3)))[:, -1]
  p3 = (p12.reshape(-1)[:, None] * np.stack([np_filtered_probs(l, temperature, top_p) for l in l3])).sum(0)
  return p12, p3


def speculate(temperature, top_p, point_mass, num=N):
  """num continuations of PROMPT, 3 tokens each, by rounds of K drafts + verification."""
  target, drafter = _models()
  L = len(PROMPT) + 3 + 2 * K + 1  # a finished row keeps drafting past its 3 tokens (ignored)
  seq_NL = np.zeros((num, L), np.int32)
  seq_NL[:, :len(PROMPT)] = PROMPT
  length_N = np.full(num, len(PROMPT))
  rows = np.arange(num)
  key = jax.random.key(123)
  params = (np.full(num, temperature, np.float32), np.zeros(num, np.int32), np.full(num, top_p, np.float32))
  while (length_N < len(PROMPT) + 3).any():
    key, sub = jax.random.split(key)
    work_NL = seq_NL.copy()
    q_NKV = np.zeros((num, K, V), np.float32)
    for j in range(K):  # the drafter samples from its own filtered distribution
      if point_mass:
        draft_N = (length_N + j * 5) % V  # fixed, mostly wrong proposals
      else:
        q_NV = np.asarray(drafter(jnp.asarray(work_NL)))[rows, length_N + j - 1]
        q_NKV[:, j] = q_NV
        filtered = sampling.filter_logits(jnp.asarray(q_NV), *params)
        draft_N = np.asarray(jax.random.categorical(jax.random.fold_in(sub, j), filtered))
      work_NL[rows, length_N + j] = draft_N
    p_all = np.asarray(target(jnp.asarray(work_NL)))
    idx_NK1 = length_N[:, None] - 1 + np.arange(K + 1)
    p_RV = p_all[rows[:, None], idx_NK1].reshape(-1, V)
    draft_R = np.concatenate([work_NL[rows[:, None], idx_NK1[:, :K] + 1], np.full((num, 1), -1)], 1).reshape(-1)
    q_RV = None if point_mass else np.concatenate([q_NKV, np.zeros((num, 1, V), np.float32)], 1).reshape(-1, V)
    num_draft_B = np.full(num, K, np.int32)
    batch = sampling.SamplingBatch(*params[:1], params[1], params[2], rows.astype(np.uint32) + 7,
                                   (length_N + K).astype(np.int32))
    tokens_BK1, accepted_B = VERIFY(p_RV, q_RV, draft_R.astype(np.int32), num_draft_B, batch)
    tokens_BK1, accepted_B = np.asarray(tokens_BK1), np.asarray(accepted_B)
    for b in np.flatnonzero(length_N < len(PROMPT) + 3):
      keep = tokens_BK1[b, :accepted_B[b] + 1]
      seq_NL[b, length_N[b]:length_N[b] + len(keep)] = keep
      length_N[b] += len(keep)
  return seq_NL[:, len(PROMPT):len(PROMPT) + 3]


def chi2_p(counts, probs):
  """p-value of a chi-squared goodness-of-fit test, cells with an expected count below 5 pooled into one."""
  counts, expected = np.ravel(counts).astype(float), np.ravel(probs) * np.sum(counts)
  small = expected < 5
  counts = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  if expected[-1] == 0:
    assert counts[-1] == 0, 'samples where the target has no mass'
    counts, expected = counts[:-1], expected[:-1]
  return stats.chisquare(counts, expected).pvalue


@pytest.mark.parametrize('point_mass', [False, True], ids=['draft_model', 'point_mass'])
@pytest.mark.parametrize('temperature,top_p', [(1.0, 1.0), (1.0, 0.9)])
def test_rejection_sampling_is_exact_in_distribution(temperature, top_p, point_mass):
  out = speculate(temperature, top_p, point_mass)
  p12, p3 = exact_distribution(temperature, top_p)
  joint = np.zeros((V, V))
  np.add.at(joint, (out[:, 0], out[:, 1]), 1)
  assert chi2_p(joint, p12) > 1e-3
  assert chi2_p(np.bincount(out[:, 2], minlength=V), p3) > 1e-3


def test_a_bad_drafter_fails_the_same_test_without_rejection():
  """The test has power: the drafter's own samples (accepting every draft) are rejected by it."""
  _, drafter = _models()
  rng = np.random.default_rng(0)
  seqs = np.tile(np.array(PROMPT + (0, 0, 0), np.int32), (4000, 1))
  for i in range(3):
    logits = np.asarray(drafter(jnp.asarray(seqs)))[:, len(PROMPT) + i - 1].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    seqs[:, len(PROMPT) + i] = [rng.choice(V, p=p) for p in probs]
  p12, _ = exact_distribution(1.0, 1.0)
  joint = np.zeros((V, V))
  np.add.at(joint, (seqs[:, 2], seqs[:, 3]), 1)
  assert chi2_p(joint, p12) < 1e-3


def test_greedy_verification_keeps_the_matching_prefix():
  """Row 0: drafts [a0, x, ...] -> a0 then a1 (the argmax after it); row 1: all match -> 3 drafts + bonus."""
  rng = np.random.default_rng(1)
  K1 = 4
  p_RV = rng.standard_normal((2 * K1, V)).astype(np.float32)
  arg = p_RV.argmax(1)
  draft_R = np.array([arg[0], (arg[1] + 1) % V, 5, -1, arg[4], arg[5], arg[6], -1], np.int32)
  batch = sampling.host_batch([(sampling.SamplingParams(), 0, 10), (sampling.SamplingParams(), 0, 10)], 2)
  tokens, accepted = VERIFY(p_RV, None, draft_R, np.array([3, 3], np.int32), batch)
  assert accepted.tolist() == [1, 3]
  assert np.asarray(tokens)[0, :2].tolist() == [arg[0], arg[1]]
  assert np.asarray(tokens)[1].tolist() == arg[4:8].tolist()


def test_no_draft_samples_as_plain_sampling():
  """A row with no drafts draws its one token exactly as sampling.sample does at that position."""
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((3, V)).astype(np.float32)
  rows = [(sampling.SamplingParams(temperature=0.7, top_p=0.8), 11 + b, 4 + b) for b in range(3)]
  batch = sampling.host_batch(rows, 3)
  plain = np.asarray(jax.jit(sampling.sample)(jnp.asarray(logits), batch))
  p_RV = np.repeat(logits, 2, axis=0)  # K1 = 2, no drafts: only row j = 0 counts
  tokens, accepted = VERIFY(p_RV, None, np.full(6, -1, np.int32), np.zeros(3, np.int32), batch)
  assert np.asarray(accepted).tolist() == [0, 0, 0]
  assert np.asarray(tokens)[:, 0].tolist() == plain.tolist()


def naive_lookup(tokens, k, max_n=3):
  for n in range(max_n, 0, -1):
    if n >= len(tokens):
      continue
    tail = tokens[-n:]
    for start in range(len(tokens) - n - 1, -1, -1):
      if tokens[start:start + n] == tail:
        return tokens[start + n:start + n + k]
  return []


def test_prompt_lookup_equals_brute_force():
  rng = np.random.default_rng(4)
  for _ in range(300):
    tokens = rng.integers(0, 5, rng.integers(1, 30)).tolist()
    k = int(rng.integers(1, 6))
    assert speculative.ngram_draft(tokens, k) == naive_lookup(tokens, k), tokens
  assert speculative.ngram_draft([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]


def test_expected_tokens():
  assert speculative.expected_tokens(0.0, 4) == 1.0
  assert speculative.expected_tokens(1.0, 4) == 5.0
  assert speculative.expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_per_token_acceptance_recovers_the_chance_that_predicts_tokens_per_verification():
  """Verifications of k = 4 drafts (some cut short, as max_tokens cuts them), each draft accepted with
  chance 0.6 while those before it were: the estimate recovers 0.6, and E(a, k) the mean tokens per
  verification; accepted / drafted does not."""
  rng, alpha = np.random.default_rng(0), 0.6
  n = rng.choice([4, 4, 4, 2], 20_000)
  accepted = np.minimum(rng.geometric(1 - alpha, n.size) - 1, n)
  s = speculative.SpecStats(verifications=n.size, drafted=int(n.sum()), accepted=int(accepted.sum()),
                            rejections=int((accepted < n).sum()))
  assert s.per_token_acceptance() == pytest.approx(alpha, abs=0.01)
  full = n == 4
  assert speculative.expected_tokens(s.per_token_acceptance(), 4) == pytest.approx(
      1 + accepted[full].mean(), rel=0.02)
  assert s.accepted / s.drafted < alpha - 0.2


@pytest.mark.parametrize('temperature,top_p', [(1.0, 1.0), (1.0, 0.9)])
def test_the_engine_with_a_bad_draft_model_is_exact_in_distribution(temperature, top_p):
  """The same test through the engine (draft steps, the q gather, verification slots, seeds,
  positions, rollback): 20,000 seeded requests of 3 tokens, a drafter unrelated to the target."""
  from serve.engine import Engine, EngineConfig  # pylint: disable=import-outside-toplevel
  from serve.sampling import SamplingParams  # pylint: disable=import-outside-toplevel
  cfg = EngineConfig(num_pages=2 * 256 + 1, page_size=4, max_seqs=256, max_pages_per_seq=2, token_budget=1024,
                     min_bucket=1024, speculative='draft', num_speculative_tokens=K,
                     speculative_max_batch=N, attention='reference')
  engine = _engines(cfg)
  outs = engine.generate([list(PROMPT)] * N, [SamplingParams(max_tokens=3, temperature=temperature,
                                                             top_p=top_p, seed=s) for s in range(N)])
  stats = engine.spec_stats
  assert stats.verifications > N // 2 and 0 < stats.accepted < stats.drafted
  assert engine._drafter.engine._chains, 'no draft round ran as one device call'  # pylint: disable=protected-access
  out = np.array(outs)
  p12, p3 = exact_distribution(temperature, top_p)
  joint = np.zeros((V, V))
  np.add.at(joint, (out[:, 0], out[:, 1]), 1)
  assert chi2_p(joint, p12) > 1e-3
  assert chi2_p(np.bincount(out[:, 2], minlength=V), p3) > 1e-3


@functools.cache
def _engines(cfg):
  from serve.engine import Engine  # pylint: disable=import-outside-toplevel
  _, tp = nnx.split(transformer.Transformer(TINY, nnx.Rngs(1)))
  _, dp = nnx.split(transformer.Transformer(TINY, nnx.Rngs(2)))
  engine = Engine(TINY, tp, cfg)
  engine.attach_drafter(Engine(TINY, dp, speculative.draft_engine_config(cfg)))
  return engine
