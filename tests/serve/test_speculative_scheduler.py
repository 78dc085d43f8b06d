"""The scheduler with draft tokens (speculative decoding), driven by a fake device and checked against a naive decode.

The fake device stores token ids in a [P, G] pool through each plan's block tables and verifies a draft greedily:
the target token at each position is next_token() of the sequence read back through the block table, and drafts are
accepted while they equal it. Outputs must equal `reference_decode` (a plain loop), whatever the drafts; after random
workloads (preemption by a small pool, prefix sharing, stop tokens, max_tokens, aborts) the allocator's invariants
hold and every page returns.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from serve.scheduler import Policy, Scheduler
from tests.serve.scheduler_harness import V, make_config, next_token, reference_decode


class SpecDevice:
  """Schedules with drafts, runs the fake device, applies the verified tokens; checks the plan as it goes."""

  def __init__(self, config, rng: random.Random, k: int, good: float):
    self.config, self.sched, self.rng, self.k, self.good = config, Scheduler(config), rng, k, good
    self.pool_PG = np.full((config.num_pages, config.page_size), -1, np.int64)
    self.spec, self.tokens, self.finished = {}, {}, {}
    self.drafted = self.accepted = self.verifications = 0

  def add(self, rid, prompt, max_tokens, stop_ids=()):
    self.sched.add(rid, prompt, max_tokens, stop_ids)
    self.spec[rid] = (tuple(prompt), max_tokens, tuple(stop_ids))
    self.tokens[rid] = list(prompt)

  def draft(self, rid):
    """k tokens: each the true next token with probability `good`, else a random one."""
    seq, out = list(self.tokens[rid]), []
    for _ in range(self.k):
      t = next_token(seq) if self.rng.random() < self.good else self.rng.randrange(V)
      out.append(t)
      seq.append(t)
    return out

  def step(self):
    G, c = self.config.page_size, self.config
    drafts = {rid: self.draft(rid) for rid in self.sched.running_ids()}
    plan = self.sched.schedule(drafts)
    assert plan.seqs and plan.num_tokens <= c.token_budget
    sampled = {}
    for s in plan.seqs:
      toks = self.tokens[s.request_id]
      n_own = len(s.token_ids) - s.num_draft
      assert s.token_ids[:n_own] == tuple(toks[s.start_pos:s.start_pos + n_own])
      assert s.token_ids[n_own:] == tuple(drafts.get(s.request_id, ())[:s.num_draft])
      if s.num_draft:
        prompt, max_tokens, _ = self.spec[s.request_id]
        assert s.sample and len(toks) - len(prompt) + s.num_draft < max_tokens, 'a draft past max_tokens'
      assert -(-(s.start_pos + len(s.token_ids)) // G) <= len(s.block_table) <= c.max_pages_per_seq
      for i, tok in enumerate(s.token_ids):
        pos = s.start_pos + i
        self.pool_PG[s.block_table[pos // G], pos % G] = tok
    for s in plan.seqs:
      if not s.sample:
        continue
      end = s.start_pos + len(s.token_ids)
      seen = [int(self.pool_PG[s.block_table[p // G], p % G]) for p in range(end)]
      last = end - s.num_draft  # the sequence before its drafts
      assert seen[:last] == self.tokens[s.request_id][:last], f'{s.request_id} reads stale or foreign tokens'
      out = []
      for j in range(s.num_draft + 1):
        target = next_token(seen[:last + j])
        out.append(target)
        if j == s.num_draft or seen[last + j] != target:
          break
      if s.num_draft:
        self.verifications += 1
        self.drafted += s.num_draft
        self.accepted += len(out) - 1
      sampled[s.request_id] = out if s.num_draft else out[0]
    finished = self.sched.update(plan, sampled)
    for s in plan.seqs:
      if s.sample and s.request_id in self.tokens:
        got = sampled[s.request_id]
        self.tokens[s.request_id] += got if isinstance(got, list) else [got]
    for fin in finished:
      self.finished[fin.request_id] = fin
      del self.tokens[fin.request_id]
    self.sched.check()

  def abort(self, rid):
    fin = self.sched.abort(rid)
    self.finished[rid] = fin
    del self.tokens[rid]
    self.sched.check()


@pytest.mark.parametrize('policy', list(Policy))
@pytest.mark.parametrize('seed', range(4))
def test_random_workloads_with_drafts(policy, seed):
  """Outputs equal the naive decode; no page leaks; every page returns (acceptance 3, on the scheduler)."""
  rng = random.Random(seed)
  G = rng.choice([1, 2, 4])
  config = make_config(page_size=G, num_pages=1 + rng.randint(40, 80) // G, max_pages_per_seq=64 // G,
                       token_budget=rng.choice([8, 16, 24]), max_seqs=4, policy=policy)
  dev = SpecDevice(config, rng, k=rng.randint(1, 5), good=rng.choice([0.3, 0.8, 1.0]))
  shared = [rng.randrange(V) for _ in range(3 * G)]
  n_steps = 0
  for i in range(10):
    prompt = (shared if i % 3 == 0 else []) + [rng.randrange(V) for _ in range(rng.randint(1, 12))]
    dev.add(f'r{i}', prompt, max_tokens=rng.randint(1, 20), stop_ids=(rng.randrange(V),))
  while dev.sched.has_work:
    dev.step()
    n_steps += 1
    if n_steps == 7 and 'r9' in dev.tokens:
      dev.abort('r9')
    assert n_steps < 2000
  for rid, fin in dev.finished.items():
    ref = reference_decode(*dev.spec[rid])
    assert fin.output_ids == (ref if fin.reason != 'abort' else ref[:len(fin.output_ids)]), rid
  alloc = dev.sched.allocator
  alloc.check()
  assert alloc.num_used == 0 and alloc.num_free + alloc.num_cached == alloc.total
  assert dev.verifications > 0


def test_rejected_drafts_return_their_pages():
  """A bad draft spanning two new pages: after verification only the pages of accepted tokens stay."""
  G = 4
  sched = Scheduler(make_config(page_size=G, num_pages=32, token_budget=16))
  prompt = list(range(1, 8))  # 7 tokens: 2 pages
  sched.add('a', prompt, max_tokens=12)
  plan = sched.schedule()
  first = next_token(prompt)
  sched.update(plan, {'a': first})
  assert len(sched.block_table('a')) == 2  # 8 tokens known, 7 computed
  wrong = (next_token(prompt + [first]) + 1) % V
  plan = sched.schedule({'a': [wrong, 1, 2, 3, 4, 5]})
  (seq,) = plan.seqs
  assert seq.num_draft == 6 and len(seq.token_ids) == 7 and len(seq.block_table) == 4  # positions 7..13
  used = sched.allocator.num_used
  sched.update(plan, {'a': [next_token(prompt + [first])]})  # the first draft rejected
  assert len(sched.block_table('a')) == 2 and sched.allocator.num_used == used - 2
  assert sched.output_ids('a') == (first, next_token(prompt + [first]))
  sched.check()


def test_drafts_capped_by_max_tokens_and_budget():
  sched = Scheduler(make_config(page_size=4, num_pages=64, token_budget=9, max_seqs=3))
  for rid, m in (('a', 3), ('b', 30), ('c', 30)):
    sched.add(rid, [1, 2, 3], max_tokens=m)
  plan = sched.schedule()
  sched.update(plan, {s.request_id: 7 for s in plan.seqs})
  plan = sched.schedule({'a': [9] * 5, 'b': [9] * 5, 'c': [9] * 5})
  drafts = {s.request_id: s.num_draft for s in plan.seqs}
  # a: 1 output, max_tokens 3: one draft (plus the verified token) reaches 3. b: budget 9 - a's 2 - 1 kept for c.
  assert drafts == {'a': 1, 'b': 5, 'c': 0}, drafts
  assert plan.num_tokens == 9
  with pytest.raises(ValueError, match='advance'):
    sched.advance(plan)
  with pytest.raises(ValueError, match='accepted drafts'):
    sched.update(plan, {'a': [8, 8], 'b': [5], 'c': 5})
  sched.update(plan, {'a': [9, 4], 'b': [9, 9, 9, 5], 'c': 5})
  assert sched.output_ids('b') == (7, 9, 9, 9, 5)
  assert 'a' not in sched.running_ids()  # max_tokens reached
  sched.check()
