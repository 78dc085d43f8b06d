"""Discrete-event simulator of serving replicas: the real Scheduler, step times from a StepTimeModel.

Each replica holds a serve.scheduler.Scheduler (the same policies, page allocator and preemption as the
engine) and replays the timeline of serve/engine.py as serve/driver.py drives it:

  - A step planned and dispatched at time t runs until t + T, T = model.step_time_s(StepShape.from_plan(plan))
    + step_overhead_s (the server's host work per step beyond Engine.step: the driver's loop, and on a CPU
    backend the HTTP threads competing with the step for the cores), stretched when the replica has just
    woken from idle (the model's `wake`, serve/sim/wake.py: a profile's steps are busy ones; None: none),
    + a deviation drawn from step_jitter_s
    (the machine's step-to-step noise: a step-time model predicts a typical step, and a deterministic timeline
    would make every gap between tokens exactly that; draws are seeded, so a run is reproducible). The shape's
    prev_tokens is the replica's step before (a step after a larger one runs slower on a CPU).
  - At t + T the step's tokens are applied (scheduler.update), the next step is planned and dispatched at once,
    and only then are the step's tokens handed to the clients: a token of the step that ran in [t, t + T) is
    read by its client at t + T + token_latency_s.
  - Requests that reach the driver while a step runs are added to the scheduler after the next dispatch (the
    driver takes its commands after engine.step() returns), so they are planned no earlier than the step after
    that. A replica with nothing to run starts a step the moment a request reaches it (every request reaching
    it at that same instant joins the step).
  - A request reaches the driver request_overhead_s after the client sent it (HTTP, parsing, tokenizing).

The server's checks come first, as in serve/routes.py and serve/driver.py: a request whose prompt + max_tokens
exceeds the context (min(max_pages_per_seq, num_pages - 1) * page_size) gets HTTP 400 ('http_4xx'), and one
arriving when max_seqs + max_waiting requests are already unfinished gets 429 ('rate_limited').

Requests run to max_tokens (= RequestSpec.output_tokens, as `stoker bench --ignore-eos` runs them); each
request's prompt is a run of one token id unique to it, so no two requests share a prefix-cache block (a
preempted request still finds its own committed pages, as on the real engine). The records are
serve.bench.client.RequestRecords filled the way the benchmark client fills them (sent_us = arrival, one
token offset per token), so serve.bench.analysis.request_rows / summarize apply unchanged; pass
SimResult.sim_s as their wall time.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
import time
from collections.abc import Sequence

from serve.bench.client import RequestRecord
from serve.bench.workload import RequestSpec
from serve.scheduler import Policy, Scheduler, SchedulerConfig
from serve.sim import wake as wake_lib
from serve.sim.router import make_router
from serve.sim.shape import StepShape, StepTimeModel

_REACH, _WAKE, _DONE = 'reach', 'wake', 'done'
_FIRST = {_REACH: 0, _WAKE: 1, _DONE: 1}  # at equal times, requests reach a driver before it plans


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReplicaConfig:
  """One replica: the engine's limits (EngineConfig's fields and defaults), its step-time model, and the
  server's limits and costs beyond the engine step (all 0 for an engine driven directly)."""
  model: StepTimeModel
  num_pages: int = 256
  page_size: int = 16
  max_seqs: int = 16
  max_pages_per_seq: int = 64
  token_budget: int = 256
  policy: Policy = Policy.CHUNKED
  watermark: float = 0.01
  prefix_caching: bool = True
  max_waiting: int = 64  # ServerConfig.max_waiting: unfinished requests beyond max_seqs get 429
  request_overhead_s: float = 0.0  # client sends -> the driver has the request
  token_latency_s: float = 0.0  # the engine hands a token out -> the client reads it
  step_overhead_s: float = 0.0  # the server's work per step beyond Engine.step
  step_jitter_s: tuple[float, ...] = ()  # deviations (s) added to step times, one drawn per step; () for none

  def __post_init__(self):
    if not callable(getattr(self.model, 'step_time_s', None)):
      raise ValueError(f'ReplicaConfig.model must be a StepTimeModel (with step_time_s(shape)); got '
                       f'{self.model!r}.')
    self.scheduler_config()  # validates the limits, naming them
    object.__setattr__(self, 'policy', Policy(self.policy))
    if self.max_seqs > self.token_budget:
      raise ValueError(f'ReplicaConfig.max_seqs={self.max_seqs} > token_budget={self.token_budget}: a step '
                       'could not decode every running sequence (the engine refuses this); raise token_budget.')
    for name in ('max_waiting', 'request_overhead_s', 'token_latency_s', 'step_overhead_s'):
      if not getattr(self, name) >= 0:
        raise ValueError(f'ReplicaConfig.{name}={getattr(self, name)!r}; use a value >= 0.')
    jitter = tuple(float(x) for x in self.step_jitter_s)
    if not all(math.isfinite(x) for x in jitter):
      raise ValueError(f'ReplicaConfig.step_jitter_s has a value that is not finite: {self.step_jitter_s!r}.')
    object.__setattr__(self, 'step_jitter_s', jitter)

  @classmethod
  def from_engine(cls, engine, model: StepTimeModel, **overrides) -> ReplicaConfig:
    """The limits of an EngineConfig (or anything with its fields)."""
    names = ('num_pages', 'page_size', 'max_seqs', 'max_pages_per_seq', 'token_budget', 'policy', 'watermark',
             'prefix_caching')
    return cls(model=model, **{n: getattr(engine, n) for n in names if hasattr(engine, n)} | overrides)

  def scheduler_config(self) -> SchedulerConfig:
    return SchedulerConfig(self.num_pages, self.page_size, self.max_seqs, self.max_pages_per_seq,
                           self.token_budget, self.policy, self.watermark, self.prefix_caching)

  @property
  def context_len(self) -> int:
    """Prompt + output tokens one request may hold (serve/routes.py context_len)."""
    return min(self.max_pages_per_seq, self.num_pages - 1) * self.page_size


@dataclasses.dataclass
class ReplicaStats:
  requests: int = 0  # accepted
  rejected: int = 0  # 429
  steps: int = 0
  busy_s: float = 0.0  # sum of step times
  tokens: int = 0  # tokens computed (prefill + decode)
  preemptions: int = 0
  peak_pages: int = 0  # most pages in use after planning a step


@dataclasses.dataclass
class SimResult:
  records: list[RequestRecord]  # in the order of the specs
  wall_s: float  # how long the simulation took
  sim_s: float  # simulated run time, from the first send to the last token (the client's wall time)
  replicas: list[ReplicaStats]

  @property
  def speedup(self) -> float:
    return self.sim_s / self.wall_s if self.wall_s > 0 else float('inf')


def _us(seconds: float) -> int:
  return int(seconds * 1e6)


class _Replica:
  """One engine behind its driver; see the module docstring for the timeline."""

  def __init__(self, cfg: ReplicaConfig, events: list, order, index: int):
    self.cfg, self.events, self.order = cfg, events, order
    self.rng = random.Random(index)  # step jitter draws
    self.last_tokens = 0  # tokens of the last step (StepShape.prev_tokens)
    self.scheduler = Scheduler(cfg.scheduler_config())
    self.stats = ReplicaStats()
    self.capacity = cfg.max_seqs + cfg.max_waiting
    self.outstanding = 0  # routed here, not finished or refused
    self.live: dict[str, RequestRecord] = {}
    self.pending: list[RequestRecord] = []  # reached the driver while a step ran
    self.inflight = None  # the plan running on the device
    self.waking = False  # a wake event is queued: the idle driver starts a step
    self.clock = wake_lib.Clock(getattr(cfg.model, 'wake', None))  # idle since the start

  def reach(self, record: RequestRecord, t: float) -> None:
    """The request reaches the driver (the server's checks, then the command queue)."""
    cfg = self.cfg
    if record.prompt_tokens + record.max_tokens > cfg.context_len:
      self.outstanding -= 1
      record.status, record.error = 400, 'http_4xx'
      record.error_message = (f'max_tokens ({record.max_tokens}) + prompt ({record.prompt_tokens} tokens) = '
                              f'{record.max_tokens + record.prompt_tokens} exceeds the context of '
                              f'{cfg.context_len} tokens (context_length_exceeded)')
      return
    if len(self.live) + len(self.pending) >= self.capacity:
      self.outstanding -= 1
      self.stats.rejected += 1
      record.status, record.error = 429, 'rate_limited'
      record.error_message = (f'The server is busy: {len(self.live) + len(self.pending)} sequences are running or '
                              f'waiting and at most {self.capacity} may (running slots + max_waiting)')
      return
    self.stats.requests += 1
    record.status = 200
    if self.inflight is None:
      self._add(record)
      if not self.waking:
        self.waking = True
        heapq.heappush(self.events, (t, _FIRST[_WAKE], next(self.order), _WAKE, self))
    else:
      self.pending.append(record)

  def _add(self, record: RequestRecord) -> None:
    request_id = str(record.index)
    self.scheduler.add(request_id, [record.index + 1] * record.prompt_tokens, record.max_tokens)
    self.live[request_id] = record

  def wake(self, t: float) -> None:
    self.waking = False
    if self.inflight is None and self.scheduler.has_work:
      self._dispatch(t)

  def done(self, t: float) -> None:
    """The step in flight ends at t: apply its tokens, plan the next, then hand the tokens out."""
    plan, self.inflight = self.inflight, None
    sampled = {s.request_id: 0 for s in plan.seqs if s.sample}
    finished = self.scheduler.update(plan, sampled)
    if self.scheduler.has_work:
      self._dispatch(t)
    visible_us = _us(t + self.cfg.token_latency_s)
    live = self.live
    for request_id in sampled:
      record = live[request_id]
      record.token_offsets_us.append(visible_us - record.sent_us)
    for f in finished:
      record = live.pop(f.request_id)
      record.finish_reason = f.reason
      record.prompt_tokens_reported = record.prompt_tokens
      record.output_tokens_reported = len(f.output_ids)
      self.outstanding -= 1
    for record in self.pending:
      self._add(record)
    self.pending.clear()
    if self.inflight is None and self.scheduler.has_work:
      self._dispatch(t)
    if self.inflight is None:
      self.clock.idle(t)

  def _dispatch(self, t: float) -> None:
    plan = self.scheduler.schedule()
    if not plan.seqs:
      raise RuntimeError(f'the scheduler planned an empty step with {self.scheduler.num_waiting} waiting and '
                         f'{self.scheduler.num_running} running requests (the engine fails here too); the pool '
                         f'({self.cfg.num_pages} pages) or slots may be too small.')
    cfg, stats = self.cfg, self.stats
    step_s = self.clock.step_s(t, cfg.model.step_time_s(StepShape.from_plan(plan, self.last_tokens))
                               + cfg.step_overhead_s)
    self.last_tokens = plan.num_tokens
    if cfg.step_jitter_s:
      step_s = max(0.0, step_s + self.rng.choice(cfg.step_jitter_s))
    self.inflight = plan
    stats.steps += 1
    stats.busy_s += step_s
    stats.tokens += plan.num_tokens
    stats.preemptions += len(plan.preempted)
    stats.peak_pages = max(stats.peak_pages, self.scheduler.allocator.num_used)
    heapq.heappush(self.events, (t + step_s, _FIRST[_DONE], next(self.order), _DONE, self))


def simulate(specs: Sequence[RequestSpec], replicas: Sequence[ReplicaConfig],
             router: str = 'round_robin') -> SimResult:
  """Runs the workload on the replicas (see the module docstring); the router picks each request's replica
  when it is sent (serve/sim/router.py)."""
  if not replicas:
    raise ValueError('simulate: give at least one ReplicaConfig.')
  pick = make_router(router).pick
  start = time.perf_counter()
  events: list = []
  order = itertools.count()
  reps = [_Replica(cfg, events, order, i) for i, cfg in enumerate(replicas)]
  records = [RequestRecord(s.index, s.arrival_s, s.prompt_tokens, s.output_tokens, sent_us=_us(s.arrival_s))
             for s in specs]
  if len({r.index for r in records}) != len(records):
    raise ValueError('simulate: RequestSpec indices must be unique (they name the requests).')
  sends = sorted(records, key=lambda r: r.arrival_s)
  i = 0
  while i < len(sends) or events:
    if i < len(sends) and (not events or sends[i].arrival_s <= events[0][0]):
      record = sends[i]
      i += 1
      rep = reps[pick([r.outstanding for r in reps])]
      rep.outstanding += 1
      heapq.heappush(events, (record.arrival_s + rep.cfg.request_overhead_s, _FIRST[_REACH], next(order),
                              _REACH, (rep, record)))
      continue
    t, _, _, kind, target = heapq.heappop(events)
    if kind == _DONE:
      target.done(t)
    elif kind == _WAKE:
      target.wake(t)
    else:
      target[0].reach(target[1], t)
  sim_s = max([(r.sent_us + (r.token_offsets_us[-1] if r.token_offsets_us else 0)) / 1e6 for r in records],
              default=0.0)
  return SimResult(records, time.perf_counter() - start, sim_s, [r.stats for r in reps])
