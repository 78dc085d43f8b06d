"""Drives a real Engine into chosen step compositions and times its steps (for serve/sim/profile.py).

The engine is fed random prompts until the step it dispatches has the wanted composition; then the
*next* step() call is timed: it waits for that step's tokens, applies them, and plans and
dispatches a following step, as a busy engine does. That is one period of the serving loop
(StepTimeModel.step_time_s). The engine's private `_inflight`, `_host_arrays`, `_compiled` are read
here on purpose: the plan just dispatched, and the compiled step to time alone.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time

import jax
import numpy as np
from flax import nnx

from models import transformer
from models.config import ModelConfig
from serve.engine import Engine
from serve.sampling import SamplingParams
from serve.scheduler import Policy, Scheduler, StepPlan

HOST_FIELDS = ('num_seqs', 'schedule_s', 'update_s', 'host_arrays_s')


def random_params(cfg: ModelConfig, seed: int = 0):
  """Random weights of the model's shapes (0.02 normal; norm scales 1): timing needs no training.
  Every leaf is a slice of one host-drawn buffer: no per-leaf device compiles, no program over all
  leaves (which takes minutes to compile for an unrolled 8B model)."""
  _, abstract = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))
  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  base = 0.02 * np.random.default_rng(seed).standard_normal(max(x.size for _, x in paths), np.float32)
  return treedef.unflatten([
      jax.numpy.ones(x.shape, x.dtype) if 'scale' in jax.tree_util.keystr(p) else
      jax.numpy.asarray(base[:x.size].reshape(x.shape), x.dtype) for p, x in paths])


class Driver:
  """Feeds an engine prompts and times its step() calls. Prompts start with one shared random
  prefix: with prefix caching on (the default), `warm` computes it once and every later prompt finds
  its context already cached, so building a context of c tokens costs no steps."""

  def __init__(self, engine: Engine, seed: int):
    self.engine, self.rng, self.ids, self.live = engine, np.random.default_rng(seed), itertools.count(), []
    c = engine.config
    self.pool_tokens = (c.num_pages - 2 - c.scheduler_config().watermark_pages) * c.page_size
    self.max_len = c.max_pages_per_seq * c.page_size
    self.prefix = self.tokens(self.max_len)

  def tokens(self, n: int) -> list[int]:
    return self.rng.integers(1, self.engine.model_cfg.vocab_size, n).tolist()

  def add(self, prompt: list[int], max_tokens: int) -> str:
    rid = f'profile-{next(self.ids)}'
    self.engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens))
    self.live.append(rid)
    return rid

  def warm(self, n: int) -> None:
    """Caches the prefix's first n tokens (recomputing any evicted pages)."""
    if n > 0 and self.engine.config.prefix_caching:
      self.add(self.prefix[:n], 1)
      while self.engine.has_work:  # runs to its end: an abort would skip committing its pages
        self.engine.step()

  def step(self) -> tuple[float, StepPlan | None]:
    """Times one step(); returns it and the plan that call dispatched (None if none)."""
    start = time.perf_counter()
    self.engine.step()
    elapsed = time.perf_counter() - start
    inflight = self.engine._inflight  # pylint: disable=protected-access  (the plan just dispatched)
    if inflight is not None and inflight.plan.preempted:
      raise RuntimeError(f'profile: a step preempted {inflight.plan.preempted}; the grid overfilled '
                         'the pool. Raise engine.num_pages or trim the grid.')
    return elapsed, None if inflight is None else inflight.plan

  def step_until(self, done, what: str, limit: int = 10_000) -> StepPlan:
    for _ in range(limit):
      _, plan = self.step()
      if plan is not None and done(plan):
        return plan
      if not self.engine.has_work:
        break
    raise RuntimeError(f'profile: the engine never dispatched a step of {what}.')

  def drain(self) -> None:
    for rid in self.live:
      self.engine.abort(rid)
    self.live = []
    while self.engine.has_work:
      self.engine.step()

  def decodes(self, b: int, context: int, steps: int) -> StepPlan | None:
    """b requests decoding from kv_len about `context` (those admitted first decode while the
    others prefill) for `steps` more steps; None if the pool or block table cannot hold them."""
    cfg = self.engine.config
    max_tokens = steps + 2 + -(-b * context // cfg.token_budget)
    if b * (context + max_tokens + 1) > self.pool_tokens or context + max_tokens > self.max_len:
      return None
    self.warm(context - 2)
    for _ in range(b):
      self.add(self.prefix[:context - 2] + self.tokens(1), max_tokens)
    return self.step_until(lambda p: len(p.seqs) == b and p.num_tokens == b, f'{b} decodes')

  # Each measure_* returns the plans of `repeats` steps of one composition and their wall times.

  def measure_decode(self, b: int, context: int, repeats: int, settle: int = 2):
    """Timed after `settle` untimed decode steps of the same batch: a server decodes back to back, and on a
    CPU the first decode after a larger step runs slower than the ones after it (measure_after times that)."""
    plans, walls = [self.decodes(b, context, settle + repeats + 1)], []
    if plans[0] is None:
      return None
    for _ in range(settle):
      plans = [self.step()[1]]
    for _ in range(repeats):
      wall, plan = self.step()
      walls.append(wall)
      plans.append(plan)
    return plans[:-1], walls

  def measure_prefill(self, q: int, cached: int, repeats: int):
    """A chunk of q tokens after `cached` context tokens (cached from the prefix, or computed by
    earlier chunks of whole budgets)."""
    cfg = self.engine.config
    if q + cached + 1 > min(self.max_len, self.pool_tokens) or q > cfg.token_budget or (
        cached % cfg.token_budget and not cfg.prefix_caching):
      return None
    self.warm(cached)
    plans, walls = [], []
    for _ in range(repeats):
      rid = self.add(self.prefix[:cached] + self.tokens(q), 1)
      plans.append(self.step_until(
          lambda p, rid=rid: p.seqs[0].request_id == rid and p.seqs[0].start_pos == cached
          and len(p.seqs[0].token_ids) == q, f'a {q}-token chunk after {cached}'))
      self.add(self.tokens(cfg.page_size), 1)  # so the timed call dispatches, as in a busy engine
      walls.append(self.step()[0])
      self.drain()
    return plans, walls

  def measure_after(self, b: int, prev: int, repeats: int):
    """b decodes right after a step of `prev` tokens (the b decodes and a new prompt's chunk; with prefill-first
    the chunk alone): StepShape.prev_tokens. None under the static policy (no new prompt joins a batch)."""
    cfg = self.engine.config
    q = prev - b if cfg.policy == Policy.CHUNKED else prev
    if cfg.policy == Policy.STATIC or not 1 <= q <= cfg.token_budget:
      return None
    if self.decodes(b, 4 * cfg.page_size, 4 * repeats + 1) is None:
      return None
    plans, walls = [], []
    for _ in range(repeats):
      self.step()  # a settled decode first
      rid = self.add(self.tokens(q), 1)
      before = self.step_until(lambda p, rid=rid: any(s.request_id == rid for s in p.seqs), f'a {q}-token chunk')
      _, plan = self.step()  # waits for that step, dispatches the decodes
      if before.num_tokens != prev or plan is None or plan.num_tokens != b or len(plan.seqs) != b:
        raise RuntimeError(f'profile: wanted {b} decodes after a {prev}-token step, got {plan} after {before}.')
      plans.append(plan)
      walls.append(self.step()[0])
    return plans, walls

  def measure_mixed(self, b: int, q: int, repeats: int):
    """b decodes and a new prompt's q-token chunk in one step."""
    if self.decodes(b, 4 * self.engine.config.page_size, 2 * repeats + 1) is None:
      return None
    plans, walls = [], []
    for _ in range(repeats):
      self.add(self.tokens(q), 1)
      _, plan = self.step()
      if plan is None or len(plan.seqs) != b + 1 or plan.num_tokens != b + q:
        raise RuntimeError(f'profile: wanted {b} decodes + a {q}-token chunk, got {plan}.')
      plans.append(plan)
      walls.append(self.step()[0])
    return plans, walls


def _row(kind: str, plans: list[StepPlan], walls: list[float], devices: list[float], buckets,
         prev_tokens: int = 0) -> dict:
  plan = plans[len(plans) // 2]
  q = [len(s.token_ids) for s in plan.seqs]
  kv = [s.start_pos + len(s.token_ids) for s in plan.seqs]
  return dict(kind=kind, q_lens=';'.join(map(str, q)), kv_lens=';'.join(map(str, kv)), prev_tokens=prev_tokens,
              num_seqs=len(q), num_decodes=sum(n == 1 for n in q), tokens=sum(q),
              bucket=next(b for b in buckets if b >= sum(q)), wall_s=round(statistics.median(walls), 7),
              wall_min_s=round(min(walls), 7), device_s=round(statistics.median(devices), 7),
              repeats=len(walls))


def measure(engine: Engine, grid, seed: int) -> list[dict]:
  """`grid.repeats` passes over every grid point, each pass in a new random order, one sample of
  each point per pass (with its device-only time right after it): samples of a point are minutes
  apart, so a machine whose load drifts is sampled across its states, and the drift does not line
  up with any feature."""
  d, budget = Driver(engine, seed), engine.config.token_budget
  points = ([('decode', b, c) for b, c in itertools.product(grid.decode_batches, grid.decode_contexts)]
            + [('prefill', q, c) for c, q in itertools.product(grid.prefill_cached, grid.prefill_chunks)]
            + sorted({('mixed', b, min(q, budget - b)) for b in grid.mixed_decodes
                      for q in grid.mixed_chunks if b < min(budget, engine.config.max_seqs)
                      and engine.config.policy == Policy.CHUNKED})  # only it mixes
            + [('after', b, prev) for b in grid.after_decodes for prev in grid.after_buckets if b < prev])
  samples = {p: ([], [], []) for p in points}  # plans, walls, device times
  rng = np.random.default_rng(seed)
  for i in range(grid.repeats):
    for point in rng.permutation(len(points)):
      kind, x, y = points[point]
      measured = getattr(d, f'measure_{kind}')(x, y, 1)
      d.drain()
      if measured is None:
        continue
      plans, walls, devices = samples[points[point]]
      plans += measured[0]
      walls += measured[1]
      devices.append(device_time(engine, measured[0][0], 1))
    logging.info('profile: pass %d of %d over %d grid points', i + 1, grid.repeats, len(points))
  rows = [_row(p[0], *samples[p], engine.config.buckets(), p[2] if p[0] == 'after' else 0)
          for p in points if samples[p][0]]
  order = {'decode': 0, 'prefill': 1, 'mixed': 2, 'after': 3}
  return sorted(rows, key=lambda r: (order[r['kind']], r['num_seqs'], r['tokens'], r['prev_tokens'], r['kv_lens']))


def device_time(engine: Engine, plan: StepPlan, repeats: int, T: int | None = None) -> float:
  """Median seconds of the compiled step alone on `plan` (the KV it writes is never read)."""
  T = T or next(b for b in engine.config.buckets() if b >= plan.num_tokens)
  arrays = engine._host_arrays(plan, T)  # pylint: disable=protected-access
  if engine._replicated is not None:  # pylint: disable=protected-access
    arrays = jax.device_put(arrays, engine._replicated)  # pylint: disable=protected-access
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    tokens, engine.pages = engine._compiled[T](engine.params, engine.pages, *arrays)  # pylint: disable=protected-access
    tokens.block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times[1:] or times)


def host_overhead(engine: Engine, batches, steps: int = 30) -> list[dict]:
  """Host work per step against batch size: Scheduler.schedule, update, and the engine's buffers."""
  cfg, rows = engine.config, []
  for b in batches:
    sched = Scheduler(cfg.scheduler_config())
    for i in range(b):
      sched.add(f'h{i}', list(range(1, cfg.page_size + 1)), steps + 2)
    while True:  # until every request decodes
      plan = sched.schedule()
      sched.update(plan, {s.request_id: 1 for s in plan.seqs if s.sample})
      if plan.num_tokens == len(plan.seqs) == b:
        break
    times = {k: [] for k in HOST_FIELDS[1:]}
    for _ in range(steps):
      start = time.perf_counter()
      plan = sched.schedule()
      mid = time.perf_counter()
      engine._host_arrays(plan, next(t for t in cfg.buckets() if t >= plan.num_tokens))  # pylint: disable=protected-access
      arrays = time.perf_counter()
      sched.update(plan, {s.request_id: 1 for s in plan.seqs if s.sample})
      times['schedule_s'].append(mid - start)
      times['host_arrays_s'].append(arrays - mid)
      times['update_s'].append(time.perf_counter() - arrays)
    rows.append(dict(num_seqs=b, **{k: round(statistics.median(v), 7) for k, v in times.items()}))
  return rows
