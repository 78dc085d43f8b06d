"""A machine that has idled runs slower for a while: the wake-up model of the serving simulator.

A profile's step times are taken back to back (serve/sim/probe.py), on a machine kept busy. A server at
low load is idle between requests, and the first steps after an idle gap run slower than that: on the 2-core
cloud VM that ships serve/sim/profiles/tiny_cpu, a 256-token prefill chunk took 1.1-3.0x its busy time
after 1-6 s idle (about 1.9x in the median; 1.1-1.35x after 0.2 s), the chunk after it ~1.5x, the decodes
after them ~1.1-1.2x, and a plain jitted matmul chain of 16.6 ms took 30 ms after 0.1-0.5 s idle (CPU
frequency and sleep states, a hypervisor waking an idle vCPU; GPUs lower their clocks when idle too). Left
out, the simulator put TTFT at low load at half the real one (benchmarks/README.md, sim_fidelity.py).

The model: a step that starts after the replica idled for gap g wakes the machine, which then runs
slowdown(tau) = 1 + (F(g) - 1) exp(-tau / R) times slower than busy at wall time tau after the wake.
Work of d busy seconds started at tau0 then takes d + R ln(1 + (F - 1) exp(-tau0 / R) (1 - exp(-d / R)))
(the integral of 1 / slowdown, solved for the end). F(g) is measured at a few gaps and interpolated in
log g (towards 1 at g = 0, held past the largest); R is one decay time for them all.

Measured by `stoker profile` (measure: one prompt of two budget chunks, then decodes, timed step by
step after each gap and back to back; wake.csv) and fitted (fit: least absolute error; a wake's slowdown
varies widely from one to the next) when the estimator loads the profile (serve/sim/estimator.py: ProfiledModel.wake; None for a profile without
wake.csv, which the simulator runs as always busy)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from typing import Sequence

import numpy as np

from serve.sampling import SamplingParams

FIELDS = ('gap_s', 'repeat', 'index', 'busy_s', 'wall_s')
GAPS_S = (0.2, 1.0, 4.0)  # idle gaps the profile measures
DECODES = 6  # decode steps timed after the prompt's chunks


@dataclasses.dataclass(frozen=True)
class Wake:
  """The slowdown after an idle gap: factors[i] right after gaps_s[i] idle, decaying with decay_s."""
  gaps_s: tuple[float, ...]
  factors: tuple[float, ...]
  decay_s: float

  def __post_init__(self):
    if (len(self.gaps_s) != len(self.factors) or not self.gaps_s or list(self.gaps_s) != sorted(self.gaps_s)
        or self.gaps_s[0] <= 0 or min(self.factors) < 1 or not self.decay_s > 0):
      raise ValueError(f'Wake needs increasing gaps > 0, one factor >= 1 for each and decay_s > 0; got {self}.')

  def factor(self, gap_s: float) -> float:
    """F(gap): linear from 1 at 0 to the first measured gap, then linear in log gap, held past the last."""
    g, f = self.gaps_s, self.factors
    if gap_s <= 0:
      return 1.0
    if gap_s <= g[0]:
      return 1.0 + (f[0] - 1.0) * gap_s / g[0]
    return float(np.interp(math.log(gap_s), np.log(g), f))

  def wall_s(self, busy_s: float, since_wake_s: float, factor: float) -> float:
    """Wall seconds of busy_s seconds of work started since_wake_s after a wake of `factor`."""
    if factor <= 1.0 or busy_s <= 0:
      return busy_s
    return float(_stretched(busy_s, since_wake_s, factor - 1.0, self.decay_s))

  def describe(self) -> str:
    gaps = ', '.join(f'{g:g} s: {f:.2f}x' for g, f in zip(self.gaps_s, self.factors))
    return f'after idle ({gaps}), decaying in {1e3 * self.decay_s:.0f} ms'


def _stretched(d, tau, a, R):
  """Wall time of d busy seconds from tau after a wake of factor 1 + a, decay R (numbers or arrays)."""
  return d + R * np.log1p(a * np.exp(-tau / R) * -np.expm1(-d / R))


class Clock:
  """A replica's wake state (serve/sim/simulator.py): when it went idle and when it last woke."""

  def __init__(self, wake: Wake | None, idle_since_s: float = 0.0):
    self.wake, self.idle_since, self.woke_at, self.factor = wake, idle_since_s, 0.0, 1.0

  def step_s(self, t: float, busy_s: float) -> float:
    """The wall time of a step of busy_s seconds dispatched at t (the replica is busy from t on)."""
    wake = self.wake
    if wake is None:
      return busy_s
    if self.idle_since is not None:
      factor = wake.factor(t - self.idle_since)
      if factor >= self.residual(t):  # a deeper sleep than what is left of the last wake
        self.woke_at, self.factor = t, factor
      self.idle_since = None
    return wake.wall_s(busy_s, t - self.woke_at, self.factor)

  def residual(self, t: float) -> float:
    return 1.0 + (self.factor - 1.0) * math.exp(-(t - self.woke_at) / self.wake.decay_s)

  def idle(self, t: float) -> None:
    """The replica has nothing in flight from t."""
    self.idle_since = t


def predict(decay_s: float, busy: Sequence[float], factors) -> np.ndarray:
  """Wall times [len(factors), len(busy)] of consecutive steps of `busy` seconds each, the first dispatched
  at a wake of each of `factors` (Wake.wall_s, for many factors at once)."""
  a = np.asarray(factors, np.float64)[:, None] - 1.0
  walls, tau = np.empty((len(a), len(busy))), np.zeros((len(a), 1))
  for i, d in enumerate(busy):
    walls[:, i:i + 1] = _stretched(d, tau, a, decay_s)
    tau = tau + walls[:, i:i + 1]
  return walls


def fit(rows: Sequence[dict]) -> Wake | None:
  """The Wake that best predicts wake.csv's rows (each pass's steps after a gap, and their busy times): the
  least absolute error of each pass's wall times over their sum (the long steps weigh most: a decode's
  jitter is the size of its slowdown), over every pass (a wake's slowdown varies from one to the next:
  1.0-3.0x for a prefill chunk after 3 s idle on the tiny CPU profile's VM; absolute, not squared, error
  lets no one pass decide), with one decay time on a log grid and for each gap its factor (>= 1); None when
  there are no rows."""
  gaps = sorted({float(r['gap_s']) for r in rows})
  if not gaps:
    return None
  series = {g: [] for g in gaps}
  for key in sorted({(float(r['gap_s']), int(r['repeat'])) for r in rows}):
    steps = sorted((int(r['index']), float(r['busy_s']), float(r['wall_s'])) for r in rows
                   if (float(r['gap_s']), int(r['repeat'])) == key)
    series[key[0]].append((np.array([s[1] for s in steps]), np.array([s[2] for s in steps])))
  factors_grid = np.linspace(1.0, 4.0, 151)
  best = None
  for R in np.geomspace(0.002, 2.0, 31):
    total, factors = 0.0, []
    for g in gaps:
      errs = sum(np.abs(predict(float(R), busy, factors_grid) - wall).sum(axis=1) / wall.sum()
                 for busy, wall in series[g])
      i = int(np.argmin(errs))
      total += float(errs[i])
      factors.append(float(factors_grid[i]))
    if best is None or total < best[0]:
      best = (total, float(R), factors)
  return Wake(tuple(gaps), tuple(best[2]), best[1])


def measure(engine, gaps_s: Sequence[float] = GAPS_S, repeats: int = 12, seed: int = 0) -> list[dict]:
  """wake.csv's rows: one request (a prompt of up to two budget chunks, then DECODES decodes) stepped
  through Engine.step() after each idle gap, each step() call's wall time against its busy time (the
  median of the same request run back to back after another, over every pass); `repeats` passes, each
  over the gaps in a new order."""
  cfg = engine.config
  rng = np.random.default_rng(seed)
  prompt = min(2 * cfg.token_budget - cfg.page_size, cfg.max_pages_per_seq * cfg.page_size - DECODES - 2,
               (cfg.num_pages - 2) * cfg.page_size - DECODES - 2)
  ids = itertools.count()

  def run() -> list[float]:
    engine.add_request(f'wake-{next(ids)}', rng.integers(1, engine.model_cfg.vocab_size, prompt).tolist(),
                       SamplingParams(max_tokens=DECODES + 1, temperature=0.0))
    walls = []
    while engine.has_work:
      start = time.perf_counter()
      engine.step()
      walls.append(time.perf_counter() - start)
    return walls

  busy, after = [], []
  run()
  for repeat in range(repeats):
    for g in rng.permutation(list(gaps_s)):
      run()
      busy.append(run())  # back to back: the machine is busy
      time.sleep(float(g))
      after.append((float(g), repeat, run()))
  n = min(len(w) for w in busy + [w for _, _, w in after])
  busy_s = [statistics.median(w[i] for w in busy) for i in range(n)]
  return [dict(gap_s=g, repeat=repeat, index=i, busy_s=round(busy_s[i], 7), wall_s=round(walls[i], 7))
          for g, repeat, walls in after for i in range(n)]
