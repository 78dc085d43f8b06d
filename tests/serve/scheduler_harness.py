"""The scheduler's test harness: a fake device, a naive per-request decode and a per-request replay.

The fake device stores token ids (standing in for keys/values) in a [P, G] page pool through each ScheduledSeq's
block table, and samples next_token() of the sequence it reads back through the block table. So wrong positions,
short block tables, a page shared while written, or a stale page read all change the outputs, which must equal
`reference_decode`, a plain loop that knows nothing of pages or steps.
"""

from __future__ import annotations

import collections
import random

import numpy as np

from serve.scheduler import Policy, Scheduler, SchedulerConfig, StepPlan

V = 61  # vocabulary of the fake model


def next_token(tokens) -> int:
  """The fake model: a deterministic function of the whole sequence so far."""
  return hash(tuple(int(t) for t in tokens)) % V


def reference_decode(prompt, max_tokens, stop_ids=()) -> tuple[int, ...]:
  tokens, out = list(prompt), []
  while len(out) < max_tokens:
    t = next_token(tokens)
    out.append(t)
    tokens.append(t)
    if t in stop_ids:
      break
  return tuple(out)


def pages_for(n_tokens: int, G: int) -> int:
  return -(-n_tokens // G)


class Harness:
  """Plays the engine: schedule, fake device step, update; checks every plan against a replay of each request."""

  def __init__(self, config: SchedulerConfig):
    self.config = config
    self.sched = Scheduler(config)
    self.pool_PG = np.full((config.num_pages, config.page_size), -1, np.int64)
    self.spec = {}          # id -> (prompt, max_tokens, stop_ids)
    self.tokens = {}        # id -> prompt + outputs seen so far
    self.next_pos = {}      # id -> expected start_pos of its next seq, while running
    self.slot = {}          # id -> slot, while running
    self.tables = {}        # id -> block table last seen, while running
    self.decoding = set()   # running ids past their (re)prefill
    self.finished = {}      # id -> Finished
    self.admitted = []      # ids in order of first admission
    self.arrival = []       # ids in order of add()
    self.plans: list[StepPlan] = []
    self.kinds: list[tuple[str, ...]] = []  # per plan, 'decode' or 'prefill' for each seq
    self.num_preempted = 0
    self.max_shared = 0     # max over steps of (sum of running block-table lengths - used pages)

  def add(self, rid, prompt, max_tokens, stop_ids=()):
    self.sched.add(rid, prompt, max_tokens, stop_ids)
    self.spec[rid] = (tuple(prompt), max_tokens, tuple(stop_ids))
    self.tokens[rid] = list(prompt)
    self.arrival.append(rid)
    self.check_state()

  def end(self, rid, reason):
    fin = self.sched.abort(rid) if reason == 'abort' else self.sched.finish(rid, reason)
    if rid in self.tokens:
      assert fin.output_ids == tuple(self.tokens[rid][len(self.spec[rid][0]):]) and fin.reason == reason
      self._forget(rid)
      self.finished[rid] = fin
      del self.tokens[rid]
    else:
      assert fin is None
    self.check_state()

  def _forget(self, rid):
    for d in (self.next_pos, self.slot, self.tables):
      d.pop(rid, None)
    self.decoding.discard(rid)

  def step(self, end_in_flight: str | None = None) -> StepPlan:
    """One engine step; end_in_flight ('abort' or an engine-side reason) ends a random request of the plan
    between the device step and update(), as the engine does for stop strings."""
    c, G = self.config, self.config.page_size
    running_before = set(self.sched.running_ids())
    waiting_before = sorted((r for r in self.tokens if r not in running_before), key=self.arrival.index)
    plan = self.sched.schedule()
    assert plan.seqs, 'an empty plan while requests wait or run'
    # FCFS, preempted requests included (they are older than any request never admitted): admission takes the
    # oldest waiting requests, skipping none.
    admitted = set(self.sched.running_ids()) - running_before
    assert admitted == set(waiting_before[:len(admitted)]), (admitted, waiting_before)
    self.plans.append(plan)
    assert plan.num_tokens == sum(len(s.token_ids) for s in plan.seqs) <= c.token_budget
    assert len(plan.seqs) <= c.max_seqs
    assert len({s.request_id for s in plan.seqs}) == len(plan.seqs)
    for rid in plan.preempted:
      assert rid in running_before, f'{rid} preempted but was not running'
      assert rid not in {s.request_id for s in plan.seqs}
      self._forget(rid)
      self.num_preempted += 1
      # Newest first: every request newer than a preempted one that still runs was scheduled before it.
      newer = {r for r in self.sched.running_ids() if self.arrival.index(r) > self.arrival.index(rid)}
      assert newer <= {s.request_id for s in plan.seqs}, (rid, newer)
    slots_in_use = {self.slot[r]: r for r in self.slot}
    seen_prefill = False
    self.kinds.append(tuple('decode' if s.request_id in self.decoding else 'prefill' for s in plan.seqs))
    for s in plan.seqs:
      rid, n, start = s.request_id, len(s.token_ids), s.start_pos
      toks = self.tokens[rid]
      assert n >= 1 and s.token_ids == tuple(toks[start:start + n]), (rid, start, s.token_ids)
      assert s.sample == (start + n == len(toks))
      assert 0 <= s.slot < c.max_seqs
      if rid in self.next_pos:  # a continuing request: positions follow on, slot and pages are stable
        assert start == self.next_pos[rid] and s.slot == self.slot[rid]
        assert s.block_table[:len(self.tables[rid])] == self.tables[rid]
      else:  # (re)admitted: starts after a run of whole cached pages, computes at least the last token
        assert start % G == 0 and start <= len(toks) - 1
        assert rid not in running_before or c.policy == Policy.STATIC
        assert slots_in_use.get(s.slot, rid) == rid, f'slot {s.slot} given to {rid} while in use'
        self.slot[rid] = s.slot
        slots_in_use[s.slot] = rid
      if rid not in self.admitted:
        self.admitted.append(rid)
      assert pages_for(start + n, G) <= len(s.block_table) <= c.max_pages_per_seq
      assert 0 not in s.block_table and len(set(s.block_table)) == len(s.block_table)
      if rid in self.decoding:
        assert n == 1 and not seen_prefill, 'a decode after a prefill chunk'
      else:
        seen_prefill = True
      self.tables[rid] = s.block_table
    # Device: write, with no page written by two sequences or held by another running sequence.
    written = set()
    for s in plan.seqs:
      others = {p for r, t in self.tables.items() if r != s.request_id for p in t}
      for i, tok in enumerate(s.token_ids):
        pos = s.start_pos + i
        page, off = s.block_table[pos // G], pos % G
        assert (page, off) not in written and page not in others, f'{s.request_id} writes page {page} of another'
        written.add((page, off))
        self.pool_PG[page, off] = tok
    sampled = {}
    for s in plan.seqs:
      if s.sample:
        length = s.start_pos + len(s.token_ids)
        seen = [int(self.pool_PG[s.block_table[p // G], p % G]) for p in range(length)]
        assert seen == self.tokens[s.request_id][:length], f'{s.request_id} reads stale or foreign tokens'
        sampled[s.request_id] = next_token(seen)
    if end_in_flight:
      rid = random.Random(len(self.plans)).choice(plan.seqs).request_id
      fin = self.sched.finish(rid, end_in_flight)  # its pages are free now; update() must skip it
      assert fin.output_ids == tuple(self.tokens[rid][len(self.spec[rid][0]):])
      self._forget(rid)
      self.finished[rid] = fin
      del self.tokens[rid]
      plan_alive = StepPlan(tuple(s for s in plan.seqs if s.request_id != rid), plan.preempted)
    finished = self.sched.update(plan, sampled)
    if end_in_flight:
      assert rid not in {f.request_id for f in finished}
      plan = plan_alive
    for s in plan.seqs:
      self.next_pos[s.request_id] = s.start_pos + len(s.token_ids)
      if s.sample:
        self.tokens[s.request_id].append(sampled[s.request_id])
        self.decoding.add(s.request_id)
    for fin in finished:
      rid = fin.request_id
      prompt, max_tokens, stop_ids = self.spec[rid]
      out = tuple(self.tokens[rid][len(prompt):])
      assert fin.output_ids == out
      assert fin.reason == ('stop' if out[-1] in stop_ids else 'length')
      assert fin.reason == 'stop' or len(out) == max_tokens
      self._forget(rid)
      self.finished[rid] = fin
      del self.tokens[rid]
    self.check_state()
    return plan

  def check_state(self):
    sched, alloc = self.sched, self.sched.allocator
    sched.check()
    assert alloc.num_free + alloc.num_used + alloc.num_cached == alloc.total
    refs = collections.Counter(p for rid in sched.running_ids() for p in sched.block_table(rid))
    assert {p for p in range(alloc.num_pages) if alloc.ref_counts[p]} == set(refs)
    assert all(alloc.ref_counts[p] == k for p, k in refs.items())
    assert alloc.num_used == len(refs)
    assert sched.num_running <= self.config.max_seqs
    assert set(self.tables) <= set(sched.running_ids())
    for rid, table in self.tables.items():
      assert sched.block_table(rid)[:len(table)] == table
    self.max_shared = max(self.max_shared, sum(refs.values()) - len(refs))

  def run(self, max_steps=10_000):
    for _ in range(max_steps):
      if not self.sched.has_work:
        return self
      self.step()
    raise AssertionError(f'no progress after {max_steps} steps')

  def check_outputs(self):
    for rid, fin in self.finished.items():
      if fin.reason in ('stop', 'length'):
        assert fin.output_ids == reference_decode(*self.spec[rid]), rid
      else:
        assert fin.output_ids == reference_decode(*self.spec[rid])[:len(fin.output_ids)], rid
    alloc = self.sched.allocator
    assert not self.sched.has_work and alloc.num_used == 0
    assert alloc.num_free + alloc.num_cached == alloc.total
    alloc.check()


def make_config(**kw):
  base = dict(num_pages=64, page_size=4, max_seqs=4, max_pages_per_seq=16, token_budget=16)
  return SchedulerConfig(**{**base, **kw})


def make_prompts(seed, n, lo=1, hi=20):
  rng = random.Random(seed)
  return [[rng.randrange(V) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
