"""Speculative decoding in the engine: greedy outputs equal the naive decode (and speculation off).

Covered (acceptance 1, engine side): prompt lookup and a draft model, mixed prompt lengths, a pool
small enough to force preemption, prefix sharing, tensor parallelism 2, stop tokens, stop strings
and max_tokens; every page of both caches returns (acceptance 3); seeded sampling reproducible;
bad configurations fail at start-up (acceptance 5).
"""

import dataclasses
import types

import jax
import numpy as np
import pytest

from parallelism.mesh import MeshConfig, make_mesh
from serve import speculative
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.serve.test_engine import (CFG, ONE_BUCKET, PARAMS, SMALL_POOL, assert_idle_and_clean,
                                     mixed_prompts, naive_greedy)

# Speculating whatever the batch (4 slots: max_seqs) and however few drafts are kept: every round
# verifies (test_backs_off_at_large_batch and test_a_request_whose_drafts_fail_pauses set the limits).
NGRAM = dataclasses.replace(SMALL_POOL, speculative='ngram', num_speculative_tokens=3,
                            speculative_max_batch=16, speculative_min_accepted=0.0)
DRAFT = dataclasses.replace(NGRAM, speculative='draft')


def perturbed(params, scale, seed=1):
  """The target's weights plus noise: a drafter that agrees often, not always."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32) * np.std(x),
                      params)


def prompts_and_limits():
  """Mixed lengths; two share a 12-token prefix (3 full pages of 4); one repeats itself (lookup hits)."""
  prompts, max_tokens = mixed_prompts()
  rng = np.random.default_rng(7)
  prefix = rng.integers(0, CFG.vocab_size, 12).tolist()
  prompts += [prefix + [5, 6], prefix + [7], [11, 12, 13, 14] * 4]
  return prompts, max_tokens + [9, 10, 12]


def check_drafter_clean(engine):
  draft = engine._drafter.engine  # pylint: disable=protected-access
  assert not draft.scheduler.has_work
  assert_idle_and_clean(draft)


@pytest.fixture(scope='module')
def ngram_engine():
  return Engine(CFG, PARAMS, NGRAM)


@pytest.fixture(scope='module')
def draft_engine():
  engine = Engine(CFG, PARAMS, DRAFT)
  engine.attach_drafter(Engine(CFG, perturbed(PARAMS, 0.3), speculative.draft_engine_config(DRAFT)))
  return engine


@pytest.mark.parametrize('which', ['ngram', 'draft'])
def test_greedy_equals_naive_with_preemption_and_prefix_sharing(which, request):
  engine = request.getfixturevalue(f'{which}_engine')
  prompts, max_tokens = prompts_and_limits()
  before = dict(engine.stats), dataclasses.replace(engine.spec_stats)
  got = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
  assert got == [naive_greedy(p, m) for p, m in zip(prompts, max_tokens)]
  stats = engine.spec_stats
  assert stats.verifications > before[1].verifications and stats.accepted > before[1].accepted
  assert stats.accepted < stats.drafted  # some drafts were rejected and rolled back
  rejections = stats.rejections - before[1].rejections  # at most one per verification, one per rejected run
  assert 0 < rejections <= stats.verifications - before[1].verifications
  assert rejections <= (stats.drafted - before[1].drafted) - (stats.accepted - before[1].accepted)
  assert engine.stats['preemptions'] > before[0]['preemptions'], 'the pool should force a preemption'
  assert_idle_and_clean(engine)
  if which == 'draft':
    check_drafter_clean(engine)
    assert engine._drafter.engine._chains, 'no draft round ran as one device call'  # pylint: disable=protected-access


@pytest.mark.parametrize('which', ['ngram', 'draft'])
def test_stop_tokens_stop_strings_and_max_tokens(which, request):
  engine = request.getfixturevalue(f'{which}_engine')
  prompt = [11, 12, 13, 14] * 4
  full = naive_greedy(prompt, 12)
  stop_token = full[5]
  got = engine.generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=(stop_token,)))
  assert got == [full[:full.index(stop_token) + 1]]
  engine.detokenize = lambda ids: ' '.join(f'<{t}>' for t in ids)
  try:
    for i in (1, 4, 7):
      got = engine.generate([prompt], SamplingParams(max_tokens=12, stop=(f'<{full[i]}>',)))
      assert got == [full[:full.index(full[i]) + 1]], i
  finally:
    engine.detokenize = None
  for m in (1, 2, 3, 5):
    assert engine.generate([prompt], SamplingParams(max_tokens=m)) == [full[:m]]
  assert_idle_and_clean(engine)
  if which == 'draft':
    check_drafter_clean(engine)


def test_seeded_sampling_is_reproducible_and_opt_out_is_plain(ngram_engine, draft_engine):
  prompts, _ = prompts_and_limits()
  params = [SamplingParams(max_tokens=10, temperature=0.8, seed=s) for s in range(4)]
  for engine in (ngram_engine, draft_engine):
    # The same requests on the same configuration and starting state (an empty prefix cache): the
    # same samples. (A warm cache changes the steps' layout, hence how many drafts each verification
    # covers, hence the draw: README, speculative decoding.)
    engine.scheduler.allocator.flush()
    first = engine.generate(prompts[-4:], params)
    engine.scheduler.allocator.flush()
    assert engine.generate(prompts[-4:], params) == first
  plain = Engine(CFG, PARAMS, dataclasses.replace(SMALL_POOL, async_scheduling=False))
  opted_out = [dataclasses.replace(p, speculate=False) for p in params]
  verifications = ngram_engine.spec_stats.verifications
  assert ngram_engine.generate(prompts[-4:], opted_out) == plain.generate(prompts[-4:], params)
  assert ngram_engine.spec_stats.verifications == verifications
  assert_idle_and_clean(ngram_engine)
  check_drafter_clean(draft_engine)


def test_backs_off_at_large_batch():
  engine = Engine(CFG, PARAMS, dataclasses.replace(NGRAM, speculative_max_batch=1))
  prompts, max_tokens = prompts_and_limits()
  got = engine.generate(prompts[:3], [SamplingParams(max_tokens=m) for m in max_tokens[:3]])
  assert got == [naive_greedy(p, m) for p, m in zip(prompts[:3], max_tokens[:3])]
  assert engine.spec_stats.backoffs > 0 and engine.stats['overlapped_steps'] > 0
  assert_idle_and_clean(engine)


class WrongDrafts(speculative.NgramDrafter):
  """Drafts that greedy decoding never keeps: each one token past the target's own (`full`)."""

  def __init__(self, prompt, full):
    self.prompt, self.full = prompt, full

  def propose(self, contexts, k, keep=()):
    done = {rid: len(c.tokens) - len(self.prompt) for rid, c in contexts.items()}
    return {rid: [(t + 1) % CFG.vocab_size for t in self.full[n:n + k]] for rid, n in done.items()}


def paused_rounds(max_tokens, k, min_accepted, pause, weight=speculative.KEPT_WEIGHT):
  """(verifications, paused tokens) of one request whose drafts are never kept, by the documented
  rule: the first token comes from the prefill; each later token is sampled paused (counting one
  off the pause), else verifies while more than one token remains; a verification keeps 0 and moves
  the average; below min_accepted the request decodes its next `pause` tokens paused."""
  kept, skip, verifications, skipped = float(k), 0, 0, 0
  for produced in range(1, max_tokens):
    if skip:
      skip, skipped = skip - 1, skipped + 1
      continue
    if max_tokens - produced <= 1:
      continue
    verifications += 1
    kept += weight * (0 - kept)
    skip = pause if kept < min_accepted else 0
  return verifications, skipped


def test_a_request_whose_drafts_fail_pauses_drafting():
  prompt, max_tokens = [3, 1, 4, 1], 40  # 12 pages of 4: room for 40 tokens and k + 1 more
  full = naive_greedy(prompt, max_tokens)
  counts, overlapped = {}, {}
  for min_accepted in (0.0, 0.5):
    engine = Engine(CFG, PARAMS, dataclasses.replace(NGRAM, speculative_min_accepted=min_accepted,
                                                     speculative_pause=16))
    engine._drafter = WrongDrafts(prompt, full)  # pylint: disable=protected-access
    assert engine.generate([prompt], SamplingParams(max_tokens=max_tokens)) == [full]
    s = engine.spec_stats
    assert s.accepted == 0
    counts[min_accepted] = (s.verifications, s.paused)
    overlapped[min_accepted] = engine.stats['overlapped_steps']
    assert_idle_and_clean(engine)
  assert counts[0.0] == (max_tokens - 2, 0) and overlapped[0.0] == 0
  # 39 decode steps: 6 verifications take the average from 3 below 0.5 (3 x 0.7^6 = 0.35), 16
  # paused, 1 verification (0.25), the last 16 paused, overlapped (nobody may draft).
  assert counts[0.5] == paused_rounds(max_tokens, 3, 0.5, 16) == (7, 32)
  assert overlapped[0.5] == 32 - 2  # each pause's first step is planned after its verification


class NoDrafts(speculative.NgramDrafter):
  """Prompt lookup that never finds a match."""

  def propose(self, contexts, k, keep=()):
    return {rid: [] for rid in contexts}


def test_a_request_that_finds_no_draft_pauses_drafting():
  """A step whose lookup finds no draft counts as keeping none (the same rule, paused_rounds): the
  request pauses and its steps overlap, where each such step would run synchronously."""
  prompt, max_tokens = [3, 1, 4, 1], 40
  engine = Engine(CFG, PARAMS, dataclasses.replace(NGRAM, speculative_min_accepted=0.5, speculative_pause=16))
  engine._drafter = NoDrafts()  # pylint: disable=protected-access
  assert engine.generate([prompt], SamplingParams(max_tokens=max_tokens)) == [naive_greedy(prompt, max_tokens)]
  s = engine.spec_stats
  assert (s.undrafted, s.paused, s.verifications) == (*paused_rounds(max_tokens, 3, 0.5, 16), 0) == (7, 32, 0)
  # Every paused step overlaps: the step that found no draft verified nothing, so the next one is
  # planned ahead of its token (a verification's is not: test_a_request_whose_drafts_fail_pauses).
  assert engine.stats['overlapped_steps'] == 32
  assert_idle_and_clean(engine)


def test_a_bad_draft_model_pauses_and_stays_exact():
  """A draft model that rarely agrees: requests pause (the drafter forgets them and prefills them
  afresh when they draft again), outputs equal the naive decode, and both caches return every page."""
  cfg = dataclasses.replace(DRAFT, speculative_min_accepted=0.5, speculative_pause=4)
  engine = Engine(CFG, PARAMS, cfg)
  engine.attach_drafter(Engine(CFG, perturbed(PARAMS, 3.0), speculative.draft_engine_config(cfg)))
  prompts, max_tokens = prompts_and_limits()
  got = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
  assert got == [naive_greedy(p, m) for p, m in zip(prompts, max_tokens)]
  s = engine.spec_stats
  assert s.paused > 0 and s.verifications > 0 and s.accepted < s.drafted
  assert_idle_and_clean(engine)
  check_drafter_clean(engine)


def test_a_draft_model_with_the_targets_weights_has_every_draft_accepted():
  """The drafts reach the target's verification on device (serve/drafting.py): a drafter with the
  target's own float32 weights proposes the target's greedy tokens, so every one is accepted; a feed
  that put any other token in a draft's place would be rejected there."""
  engine = Engine(CFG, PARAMS, DRAFT)
  engine.attach_drafter(Engine(CFG, PARAMS, speculative.draft_engine_config(DRAFT, weight_dtype=None)))
  prompts, max_tokens = prompts_and_limits()
  got = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
  assert got == [naive_greedy(p, m) for p, m in zip(prompts, max_tokens)]
  s = engine.spec_stats
  assert s.drafted > 2 * s.verifications > 0 and s.accepted == s.drafted and s.rejections == 0
  assert_idle_and_clean(engine)
  check_drafter_clean(engine)


def test_tensor_parallel_2_with_a_draft_model():
  mesh = make_mesh(MeshConfig(ici=(1, 1, 2)), jax.devices()[:2])
  cfg = dataclasses.replace(ONE_BUCKET, speculative='draft', num_speculative_tokens=3,
                            speculative_max_batch=16)
  engine = Engine(CFG, PARAMS, cfg, mesh)
  engine.attach_drafter(Engine(CFG, perturbed(PARAMS, 0.3), speculative.draft_engine_config(cfg), mesh))
  prompts, max_tokens = prompts_and_limits()
  got = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
  assert got == [naive_greedy(p, m) for p, m in zip(prompts, max_tokens)]
  assert engine.spec_stats.accepted > 0 and engine.stats['preemptions'] > 0
  assert_idle_and_clean(engine)
  check_drafter_clean(engine)


@pytest.mark.parametrize('kwargs,match', [
    (dict(speculative='ngram', num_speculative_tokens=0), 'num_speculative_tokens=0'),
    (dict(speculative='ngram', num_speculative_tokens=16), 'token_budget=16'),
    (dict(speculative='eagle', num_speculative_tokens=2), "speculative='eagle'"),
    (dict(num_speculative_tokens=2), 'without a drafter'),
    (dict(speculative='ngram', num_speculative_tokens=2, speculative_max_batch=0), 'speculative_max_batch'),
    (dict(speculative='ngram', num_speculative_tokens=2, speculative_min_accepted=2.5), 'from 0 .never pause. to'),
    (dict(speculative='ngram', num_speculative_tokens=2, speculative_min_accepted=-1), 'speculative_min_accepted'),
    (dict(speculative='ngram', num_speculative_tokens=2, speculative_pause=0), 'speculative_pause'),
])
def test_bad_configuration_fails_at_start_up(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(SMALL_POOL, **kwargs)


def test_a_drafter_of_another_vocabulary_is_refused(draft_engine, ngram_engine):
  # Checked before anything of the drafter is used: a stand-in with another vocabulary will do.
  small = types.SimpleNamespace(model_cfg=dataclasses.replace(CFG, vocab_size=128),
                                config=speculative.draft_engine_config(DRAFT))
  with pytest.raises(ValueError, match='vocabulary of 128 tokens, the target 256'):
    draft_engine.attach_drafter(small)
  with pytest.raises(ValueError, match="speculative='ngram'"):
    ngram_engine.attach_drafter(small)
  with pytest.raises(ValueError, match='prefix_caching=False'):
    draft_engine.attach_drafter(types.SimpleNamespace(model_cfg=CFG, config=DRAFT))


@pytest.mark.parametrize('paused', [False, True], ids=['drafting', 'pausing'])
@pytest.mark.parametrize('which', ['ngram', 'draft'])
def test_random_workloads_return_every_page(which, paused, request):
  """Requests arriving while others run, greedy and sampled, some aborted mid-flight: both caches'
  allocator invariants hold after every step and every page returns (acceptance 3). `pausing`: the
  acceptance back-off pauses a request for 2 tokens after any verification that rejects a draft."""
  engine = request.getfixturevalue(f'{which}_engine')
  if paused:
    cfg = dataclasses.replace(engine.config, speculative_min_accepted=3.0, speculative_pause=2)
    engine = Engine(CFG, PARAMS, cfg)
    if which == 'draft':  # the draft_engine fixture's drafter
      engine.attach_drafter(Engine(CFG, perturbed(PARAMS, 0.3), speculative.draft_engine_config(cfg)))
  rng = np.random.default_rng(11)
  prompts, _ = prompts_and_limits()
  pending = [(f'w{i}', prompts[i % len(prompts)][:int(rng.integers(1, 20))] + [int(i)],
              SamplingParams(max_tokens=int(rng.integers(1, 16)), temperature=float(rng.choice([0, 0.9])),
                             seed=i))
             for i in range(14)]
  live, steps = set(), 0
  while pending or engine.has_work:
    if pending and rng.random() < 0.5:
      rid, prompt, params = pending.pop()
      engine.add_request(rid, prompt, params)
      live.add(rid)
    if live and rng.random() < 0.05:
      victim = sorted(live)[int(rng.integers(len(live)))]
      engine.abort(victim)
      live.discard(victim)
    for out in engine.step():
      if out.finished:
        live.discard(out.request_id)
    engine.scheduler.check()
    if which == 'draft':
      engine._drafter.engine.scheduler.check()  # pylint: disable=protected-access
    steps += 1
    assert steps < 2000
  assert engine.spec_stats.verifications > 0 and (engine.spec_stats.paused > 0) == paused
  assert_idle_and_clean(engine)
  if which == 'draft':
    check_drafter_clean(engine)
