"""Scheduler driven by a fake device (tests/serve/scheduler_harness.py), checked against a naive per-request decode.

Every plan is replayed per request, and the outputs must equal `reference_decode`, a plain loop that knows nothing of
pages or steps: wrong positions, short block tables, a page shared while written, or a stale page read all show.
"""

from __future__ import annotations

import random

import pytest

import numpy as np

from serve.scheduler import PLACEHOLDER, Policy, Scheduler, SchedulerConfig, StepPlan
from tests.serve.scheduler_harness import Harness, V, make_config, make_prompts, next_token, reference_decode


@pytest.mark.parametrize('policy', list(Policy))
@pytest.mark.parametrize('G, budget', [(1, 3), (4, 16), (8, 5)])
def test_outputs_equal_naive_decode(policy, G, budget):
  h = Harness(make_config(page_size=G, token_budget=budget, num_pages=256 // G, max_pages_per_seq=64 // G,
                          policy=policy))
  for i, p in enumerate(make_prompts(G, 7)):
    h.add(f'r{i}', p, max_tokens=1 + i % 9, stop_ids=(i % V,))
  h.run().check_outputs()
  assert h.num_preempted == 0
  assert h.admitted == h.arrival  # first-come-first-served


def test_chunked_decodes_first_and_never_stalled():
  h = Harness(make_config(token_budget=8, max_seqs=3))
  h.add('a', list(range(5)), 30)
  h.add('b', list(range(20, 40)), 30)  # 20 tokens: three chunks of <= 8 behind a's decodes
  h.add('c', list(range(40, 45)), 30)
  mixed = 0
  while h.sched.has_work:
    decoding_before = set(h.decoding)
    plan = h.step()
    # Stall-free: every request that was decoding gets its token (the budget allows it, the pool is big).
    assert decoding_before <= {s.request_id for s in plan.seqs}
    mixed += any(len(s.token_ids) > 1 for s in plan.seqs) and bool(decoding_before)
  assert mixed >= 2  # prefill chunks rode along with decodes
  # b's prompt went in chunks that filled the budget left over by decodes.
  b_chunks = [len(s.token_ids) for p in h.plans for s in p.seqs if s.request_id == 'b' and s.start_pos < 20]
  assert sum(b_chunks) == 20 and max(b_chunks) <= 8 and len(b_chunks) >= 3
  h.check_outputs()


def test_pages_granted_on_demand_not_for_max_tokens():
  h = Harness(make_config(page_size=4, token_budget=32))
  h.add('a', list(range(9)), max_tokens=40)
  h.step()
  assert len(h.sched.block_table('a')) == 3  # 9 prompt tokens: 3 pages, nothing for the 40 outputs
  h.step()  # decode of token 9 (position 9) fits page 3
  assert len(h.sched.block_table('a')) == 3
  for _ in range(3):
    h.step()  # positions 10, 11, 12: the last crosses into a 4th page
  assert len(h.sched.block_table('a')) == 4
  h.run().check_outputs()


def test_more_decodes_than_budget():
  h = Harness(make_config(max_seqs=4, token_budget=2, policy=Policy.PREFILL_FIRST))
  for i in range(4):
    h.add(f'r{i}', [i + 1], 6)
  h.step()
  h.step()  # prefill-first admits r2, r3 while r0, r1 wait to decode
  assert h.sched.num_running == 4
  assert [s.request_id for s in h.step().seqs] == ['r0', 'r1']  # the budget decodes the oldest two
  h.run().check_outputs()
  assert max(p.num_tokens for p in h.plans) == 2


@pytest.mark.parametrize('policy', list(Policy))
def test_forced_preemption_matches_big_pool(policy):
  prompts = make_prompts(7, 6, 3, 12)
  outs = {}
  for pages in (64, 7):  # 6 usable pages of 4 tokens: far fewer than 6 requests of up to 12 + 12 tokens need
    h = Harness(make_config(num_pages=pages, max_pages_per_seq=6, policy=policy))
    for i, p in enumerate(prompts):
      h.add(f'r{i}', p, 12)
    h.run().check_outputs()
    outs[pages] = {r: f.output_ids for r, f in h.finished.items()}
    assert (h.num_preempted > 0) == (pages == 7)
  assert outs[64] == outs[7]


def test_preemption_takes_the_newest_request():
  # 4 usable pages of 2 tokens; a and b each hold 2 pages after their prompts, then both need a third.
  h = Harness(make_config(num_pages=5, page_size=2, max_pages_per_seq=4, token_budget=8, prefix_caching=False,
                          watermark=0))
  h.add('a', [1, 2, 3], 5)
  h.add('b', [4, 5, 6], 5)
  preempted = []
  while h.sched.has_work:
    preempted += h.step().preempted
  assert preempted and preempted[0] == 'b'
  h.check_outputs()


def test_prefix_sharing_shares_pages_and_skips_compute():
  G = 4
  h = Harness(make_config(page_size=G, token_budget=64, max_seqs=4))
  system = list(range(1, 13))  # three full pages
  h.add('first', system + [50, 51], 20)
  h.step()
  h.step()  # first's pages committed after its prefill step
  for i in range(3):
    h.add(f'q{i}', system + [30 + i, 40 + i], 20)
  plan = h.step()
  starts = {s.request_id: s.start_pos for s in plan.seqs if s.request_id.startswith('q')}
  assert starts == {'q0': 12, 'q1': 12, 'q2': 12}  # the three shared pages are not recomputed
  tables = [h.sched.block_table(r) for r in ('first', 'q0', 'q1', 'q2')]
  assert all(t[:3] == tables[0][:3] for t in tables)
  alloc = h.sched.allocator
  assert alloc.num_used < sum(len(t) for t in tables)
  assert alloc.num_used == 3 + sum(len(t) - 3 for t in tables)
  h.run().check_outputs()
  assert h.max_shared >= 9


def test_prefix_cache_serves_a_finished_request_and_whole_prompt_keeps_last_token():
  G = 4
  h = Harness(make_config(page_size=G, token_budget=64))
  prompt = list(range(1, 17))  # exactly four pages
  h.add('a', prompt, 3)
  h.run()
  assert h.sched.allocator.num_cached >= 4
  h.add('b', prompt, 3)
  plan = h.step()
  (seq,) = plan.seqs
  assert seq.start_pos == 12 and seq.token_ids == (13, 14, 15, 16)  # last page recomputed: its logits are needed
  h.add('c', prompt + [next_token(prompt)], 2)  # a's prompt + its first output: 17 tokens, 4 full pages cached
  plan = h.step()
  assert {s.request_id: s.start_pos for s in plan.seqs}['c'] == 16
  h.run().check_outputs()


def test_prefix_caching_off_computes_everything():
  h = Harness(make_config(prefix_caching=False, token_budget=64))
  h.add('a', list(range(1, 17)), 3)
  h.run()
  h.add('b', list(range(1, 17)), 3)
  plan = h.step()
  assert plan.seqs[0].start_pos == 0 and h.sched.allocator.num_cached == 0
  h.run().check_outputs()


def test_prefill_first_steps_are_pure():
  h = Harness(make_config(policy=Policy.PREFILL_FIRST, token_budget=8, max_seqs=4))
  h.add('a', [1, 2, 3], 20)
  h.add('b', [4, 5, 6, 7, 8], 20)  # 3 + 5 fill the budget: one prefill step for both
  plan = h.step()
  assert [(s.request_id, len(s.token_ids)) for s in plan.seqs] == [('a', 3), ('b', 5)]
  assert all(len(s.token_ids) == 1 for s in h.step().seqs)  # nothing waits: decode all
  h.add('c', list(range(10, 30)), 5)  # 20 tokens > budget: chunked, and decodes stall meanwhile
  h.add('d', [9, 9], 5)
  chunks = [h.step() for _ in range(3)]
  assert [[(s.request_id, len(s.token_ids)) for s in p.seqs] for p in chunks] == [
      [('c', 8)], [('c', 8)], [('c', 4), ('d', 2)]]
  h.run().check_outputs()
  assert all(len(set(kinds)) == 1 for kinds in h.kinds), 'a prefill-first step mixed decodes and prefills'
  assert ('prefill',) in h.kinds and ('decode',) * 4 in h.kinds


def test_prefill_first_admits_whole_prompts_only():
  h = Harness(make_config(policy=Policy.PREFILL_FIRST, token_budget=8))
  h.add('a', [1, 2, 3, 4, 5], 4)
  h.add('b', [6, 7, 8, 9], 4)  # 5 + 4 > 8: b waits for the next step rather than being split
  assert [(s.request_id, len(s.token_ids)) for s in h.step().seqs] == [('a', 5)]
  assert [(s.request_id, len(s.token_ids)) for s in h.step().seqs] == [('b', 4)]
  h.run().check_outputs()


def test_static_runs_a_batch_to_completion():
  h = Harness(make_config(policy=Policy.STATIC, max_seqs=2, token_budget=16))
  for i, (p, n) in enumerate([([1, 2], 3), ([3, 4, 5], 8), ([6], 2), ([7, 8], 2)]):
    h.add(f'r{i}', p, n)
  batches, current = [], set()
  while h.sched.has_work:
    before = set(h.sched.running_ids())
    h.step()
    new = set(h.sched.running_ids()) - before
    if new:
      assert not before, 'static batching admitted a request while its batch ran'
      current = set(new)
      batches.append(current)
  assert batches == [{'r0', 'r1'}, {'r2', 'r3'}]
  h.check_outputs()


def test_watermark_holds_back_admission():
  def run(watermark):
    # 10 usable pages of 4 tokens; a and b take 4 each; c needs 2 more.
    h = Harness(make_config(num_pages=11, page_size=4, token_budget=64, watermark=watermark, prefix_caching=False))
    h.add('a', list(range(16)), 4)
    h.add('b', list(range(16, 32)), 4)
    h.add('c', list(range(32, 40)), 4)
    return h, {s.request_id for s in h.step().seqs}
  h, first = run(0.2)  # 2 pages held back: c would leave 0
  assert first == {'a', 'b'}
  h.run().check_outputs()
  h, first = run(0.0)
  assert first == {'a', 'b', 'c'}
  h.run().check_outputs()


def test_abort_and_finish_in_flight_and_waiting():
  h = Harness(make_config(max_seqs=2, token_budget=16))
  h.add('a', [1, 2, 3], 10)
  h.add('b', [4, 5], 10)
  h.add('c', [6, 7, 8], 10)  # waits for a slot
  h.step()
  h.step()
  plan = h.sched.schedule()
  assert h.sched.abort('a').reason == 'abort'  # between schedule() and update(): its pages are free at once
  assert h.sched.finish('b', 'stop_string').output_ids == tuple(h.tokens['b'][2:])
  assert h.sched.allocator.num_used == 0
  assert h.sched.update(plan, {s.request_id: 0 for s in plan.seqs}) == []
  h.sched.check()
  for rid in ('a', 'b'):
    del h.tokens[rid]
    h._forget(rid)
  h.end('c', 'abort')  # a waiting request
  h.end('zzz', 'abort')  # unknown: a no-op
  assert not h.sched.has_work and h.sched.allocator.num_used == 0


@pytest.mark.parametrize('seed', range(9))
def test_randomized_stress(seed):
  """Random arrivals (often sharing a prefix), aborts and engine-side finishes on small pools: invariants after
  every call, outputs equal to the naive decode, and nothing leaked at the end."""
  rng = random.Random(seed)
  policy = list(Policy)[seed % 3]
  G = rng.choice([1, 2, 4])
  M = rng.randint(3, 8)
  config = SchedulerConfig(
      num_pages=rng.randint(M + 1, 2 * M + 2), page_size=G, max_seqs=rng.randint(2, 6), max_pages_per_seq=M,
      token_budget=rng.randint(1, 12), policy=policy, watermark=rng.choice([0.0, 0.01, 0.2]),
      prefix_caching=seed % 4 != 3)
  h = Harness(config)
  stems = [[rng.randrange(V) for _ in range(M * G)] for _ in range(2)]  # shared prefixes
  limit = min(M, config.num_pages - 1) * G
  n_added, steps = 0, 0
  while steps < 400 or h.sched.has_work:
    if steps < 400 and rng.random() < 0.5:
      n_prompt = rng.randint(1, limit - 1)
      prompt = (rng.choice(stems)[:n_prompt] if rng.random() < 0.7 else
                [rng.randrange(V) for _ in range(n_prompt)])
      h.add(f'r{n_added}', prompt, rng.randint(1, limit - n_prompt), stop_ids=rng.sample(range(V), 2))
      n_added += 1
    if h.tokens and rng.random() < 0.03:
      h.end(rng.choice(sorted(h.tokens)), rng.choice(['abort', 'stop_string']))
    if h.sched.has_work:
      h.step(end_in_flight=rng.choice(['abort', 'stop_string']) if rng.random() < 0.02 else None)
    steps += 1
    assert steps < 5000, 'no progress'
  h.check_outputs()
  assert h.admitted == [r for r in h.arrival if r in h.admitted]  # FCFS
  assert len(h.finished) == n_added


@pytest.mark.parametrize('field, value, match', [
    ('num_pages', 1, 'num_pages must be an int >= 2'),
    ('page_size', 0, 'page_size must be an int >= 1'),
    ('max_seqs', 0, 'max_seqs must be an int >= 1'),
    ('max_pages_per_seq', 2.5, 'max_pages_per_seq must be an int'),
    ('token_budget', 0, 'token_budget must be an int >= 1'),
    ('token_budget', True, 'token_budget must be an int'),
    ('policy', 'fastest', "policy must be one of \\['chunked', 'prefill_first', 'static'\\]"),
    ('watermark', 1.0, r'watermark must be a fraction of the pool in \[0, 1\)'),
    ('watermark', -0.1, 'watermark must be a fraction'),
    ('prefix_caching', 'yes', 'prefix_caching must be a bool'),
])
def test_bad_config(field, value, match):
  with pytest.raises(ValueError, match=match):
    make_config(**{field: value})


def test_policy_by_name():
  assert make_config(policy='prefill_first').policy is Policy.PREFILL_FIRST


def test_bad_requests():
  sched = Scheduler(make_config(num_pages=9, page_size=4, max_pages_per_seq=4))  # 16-token table, 32-token pool
  with pytest.raises(ValueError, match='empty prompt'):
    sched.add('a', [], 4)
  with pytest.raises(ValueError, match='max_tokens must be an int >= 1'):
    sched.add('a', [1], 0)
  with pytest.raises(ValueError, match=r'= 17 tokens exceeds the block table.*raise max_pages_per_seq'):
    sched.add('a', [1] * 10, 7)
  sched.add('a', [1] * 10, 6)  # exactly 16 fits
  with pytest.raises(ValueError, match="'a' is already queued or running"):
    sched.add('a', [1], 1)
  small_pool = Scheduler(make_config(num_pages=3, page_size=4, max_pages_per_seq=4))  # 2 usable pages: 8 tokens
  with pytest.raises(ValueError, match=r'= 9 tokens exceeds the whole pool.*raise num_pages'):
    small_pool.add('b', [1] * 5, 4)
  assert sched.num_waiting == 1 and small_pool.num_waiting == 0
  with pytest.raises(KeyError, match='unknown request id'):
    sched.output_ids('nope')


def test_misuse_of_the_step_protocol():
  sched = Scheduler(make_config())
  sched.add('a', [1, 2, 3], 4)
  plan = sched.schedule()
  with pytest.raises(RuntimeError, match='without update'):
    sched.schedule()
  with pytest.raises(ValueError, match=r"no sampled token for requests \['a'\]"):
    sched.update(plan, {})
  assert sched.update(plan, {'a': 7}) == []  # the failed call changed nothing; the retry applies the step
  sched.add('b', [4], 4)
  plan = sched.schedule()
  stale = StepPlan(plan.seqs[:1], ())
  with pytest.raises(ValueError, match='not the last one schedule'):
    sched.update(stale, {'a': 1})
  assert sched.update(plan, {'a': 1, 'b': 2}) == []
  with pytest.raises(ValueError, match='already applied'):
    sched.update(plan, {'a': 1, 'b': 2})
  assert sched.output_ids('a') == (7, 1) and sched.output_ids('b') == (2,)
  sched.check()


def run_overlapped(config, requests, abort_every=0, seed=0, ahead=1):
  """Drives the scheduler as the async engine does: each plan is advanced (placeholders), the next planned and
  'dispatched' before the one before is resolved; with ahead > 1, up to `ahead` plans are advanced unresolved
  (a draft model's k steps run in one device call). The fake device writes token ids into a [P, G] pool, taking a
  placeholder input from the previous step's sampled tokens, and samples next_token of what it reads back."""
  sched, G = Scheduler(config), config.page_size
  pool_PG = np.full((config.num_pages, G), -1, np.int64)
  for rid, (prompt, max_tokens, stop_ids) in requests.items():
    sched.add(rid, prompt, max_tokens, stop_ids)
  rng, finished, inflight, wasted = random.Random(seed), {}, [], 0
  last_sampled, dispatched = {}, False  # the newest plan's tokens; whether it awaits advance()

  def device(plan, prev_sampled):
    sampled = {}
    for s in plan.seqs:
      for i, tok in enumerate(s.token_ids):
        pos = s.start_pos + i
        if tok == PLACEHOLDER:
          assert i == len(s.token_ids) - 1, 'a placeholder that is not a decode input'
          tok = prev_sampled[s.request_id]
        pool_PG[s.block_table[pos // G], pos % G] = tok
      if s.sample:
        n = s.start_pos + len(s.token_ids)
        sampled[s.request_id] = next_token([int(pool_PG[s.block_table[p // G], p % G]) for p in range(n)])
    return sampled

  while sched.has_work or inflight:
    plan = None
    if dispatched:
      sched.advance(inflight[-1][0])
    if sched.has_work:
      plan = sched.schedule()
      plan = plan if plan.seqs else None
    if abort_every and rng.random() < 1 / abort_every and sched.running_ids():
      rid = rng.choice(sched.running_ids())
      finished[rid] = sched.abort(rid)
      assert PLACEHOLDER not in finished[rid].output_ids
    while inflight and (len(inflight) >= ahead or plan is None):
      for f in sched.resolve(*inflight.pop(0)):
        finished[f.request_id] = f
    sched.check()
    dispatched = plan is not None
    if plan is not None:
      last_sampled = device(plan, last_sampled)
      inflight.append((plan, last_sampled))
      wasted += sum(s.request_id in finished for s in plan.seqs if s.sample)
  return finished, wasted


@pytest.mark.parametrize('ahead', [1, 3])
@pytest.mark.parametrize('seed', range(6))
def test_overlapped_steps_equal_naive_decode(seed, ahead):
  """advance/schedule/resolve, one or three steps ahead: outputs equal the naive decode (stop tokens cost wasted
  tokens, never a wrong one), with preemption on small pools, prefix sharing, aborts in flight, and nothing leaked."""
  rng = random.Random(seed)
  G = rng.choice([1, 2, 4])
  config = make_config(page_size=G, num_pages=rng.randint(24, 40) // G + 2, max_pages_per_seq=48 // G,
                       token_budget=rng.randint(3, 12), max_seqs=rng.randint(2, 5), policy=list(Policy)[seed % 3],
                       prefix_caching=seed % 2 == 0)
  stem = [rng.randrange(V) for _ in range(12)]
  requests = {f'r{i}': ((stem[:rng.randint(1, 12)] if i % 2 else []) + [rng.randrange(V) for _ in range(3)],
                        rng.randint(1, 8), tuple(rng.sample(range(V), 3))) for i in range(10)}
  finished, wasted = run_overlapped(config, requests, abort_every=0 if seed < 3 else 15, seed=seed, ahead=ahead)
  assert set(finished) == set(requests)
  for rid, f in finished.items():
    want = reference_decode(*requests[rid])
    if f.reason == 'abort':
      assert f.output_ids == want[:len(f.output_ids)], rid
    else:
      assert f.output_ids == want and f.reason == ('stop' if want[-1] in requests[rid][2] else 'length'), rid


def test_done_requests_are_not_planned_past_max_tokens():
  """After advance, a request whose last output (a placeholder) reaches max_tokens is not planned again, and
  resolve ends it with the real token."""
  sched = Scheduler(make_config())
  sched.add('a', [1, 2, 3], 1)
  sched.add('b', [4, 5], 3)
  plan = sched.schedule()
  sched.advance(plan)
  assert sched.output_ids('a') == () and sched.output_ids('b') == ()
  ahead = sched.schedule()
  assert [s.request_id for s in ahead.seqs] == ['b'] and ahead.seqs[0].token_ids == (PLACEHOLDER,)
  with pytest.raises(ValueError, match='not the oldest advanced'):
    sched.resolve(ahead, {'b': 9})
  sched.advance(ahead)  # two plans ahead; 'b' now holds two placeholders and reaches max_tokens with the third
  third = sched.schedule()
  assert [(s.request_id, s.token_ids) for s in third.seqs] == [('b', (PLACEHOLDER,))]
  with pytest.raises(RuntimeError, match='advanced plans unresolved'):
    sched.update(third, {'b': 1})
  sched.advance(third)
  done = sched.resolve(plan, {'a': 7, 'b': 8})
  assert [(f.request_id, f.output_ids, f.reason) for f in done] == [('a', (7,), 'length')]
  assert sched.resolve(ahead, {'b': 9}) == [] and sched.output_ids('b') == (8, 9)
  done = sched.resolve(third, {'b': 5})
  assert [(f.request_id, f.output_ids, f.reason) for f in done] == [('b', (8, 9, 5), 'length')]
  sched.check()
