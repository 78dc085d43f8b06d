"""`stoker plan`: the cheapest serving configuration that meets a latency SLO, found by simulation.

For each candidate replica (plan_space: hardware x tensor parallelism x batch cap x token budget, those that
fit in memory), its capacity is the highest arrival rate at which the simulated workload meets the SLO:
serve.bench.capacity.search over serve.sim.simulator runs (the same requests at every rate). Rates are snapped
down to a geometric grid (ratio 1 + tolerance) and the search stops within that tolerance, so a capacity is the
highest grid rate that passes, and a tighter SLO never finds a higher one (as long as passing is monotone in
the rate). The search never goes above what the replica sustains: the lower of a throughput bound from the
step-time model (each request holds one of max_seqs slots for at least output_tokens steps, and its prompt +
output - 1 tokens cannot go faster than a full step's tokens/s) and the throughput of a saturated simulation
(a short run at a rate above that would pass a loose SLO only because it ends before the queue grows).
A candidate whose run at FLOOR x its throughput bound fails has no capacity.

Pruning never changes the answer: candidates are searched in order of bound per dollar, and one whose bound
cannot beat the best capacity per dollar found (nor, with a target, the best cost) is not searched.
Replicas for a target rate Q: ceil(Q / capacity), checked by one simulation of that many replicas behind the
router at rate Q (replicas are added while it fails, at most MAX_EXTRA_REPLICAS).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np

from serve.bench import capacity, workload
from serve.bench.workload import WorkloadConfig
from serve.engine import EngineConfig
from serve.sim import plan_space, simulator
from serve.sim.plan_space import Candidate, Hardware
from serve.sim.shape import StepShape, StepTimeModel
from serve.sim.slo import LatencySLO

FLOOR = 1 / 16  # the lowest rate, in throughput bounds: a replica failing there cannot meet the SLO
START = 0.7  # the search's first rate, in ceilings (what the replica sustains)
SATURATION = 3  # the saturated run: this many x max_seqs requests, all at once
MAX_EXTRA_REPLICAS = 3


class ImpossibleSLO(ValueError):
  """No configuration meets the SLO even at the lowest load searched; `best` holds the lowest value of each
  SLO metric any configuration reached there, `results` every configuration's search."""

  def __init__(self, message: str, best: dict, results: list[dict]):
    super().__init__(message)
    self.best, self.results = best, results


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  workload: WorkloadConfig  # its rate is what the search varies
  slo: LatencySLO
  target_qps: float | None = None
  max_seqs: tuple[int, ...] = (32, 128)
  token_budgets: tuple[int, ...] = (512, 2048)
  page_size: int = 16
  tolerance: float = 0.1
  router: str = 'least_outstanding'
  prune: bool = True

  def __post_init__(self):
    if self.target_qps is not None and not self.target_qps > 0:
      raise ValueError(f'--target-qps {self.target_qps}: give requests/s > 0.')
    if not 0 < self.tolerance < 1:
      raise ValueError(f'plan tolerance {self.tolerance}: give a fraction in (0, 1).')
    if not self.max_seqs or not self.token_budgets or min(self.max_seqs + self.token_budgets) < 1:
      raise ValueError(f'plan: give positive batch caps ({self.max_seqs}) and token budgets '
                       f'({self.token_budgets}).')
    workload.with_rate(self.workload, 1.0)  # refuses arrival=trace, which has no rate to vary


def snap(rate: float, tolerance: float) -> float:
  """The grid rate (1 + tolerance)^k at or below `rate`."""
  g = 1 + tolerance
  k = math.floor(math.log(rate) / math.log(g) + 1e-9)
  return g ** k


def throughput_bound(model: StepTimeModel, engine: EngineConfig, specs) -> float:
  """Requests/s one replica cannot exceed in steady state (see the module docstring)."""
  prompt = np.mean([s.prompt_tokens for s in specs])
  output = np.mean([s.output_tokens for s in specs])
  min_kv = min(s.prompt_tokens for s in specs) + 1
  slots = min(engine.max_seqs, (engine.num_pages - 1) // -(-min_kv // engine.page_size))
  t_decode = model.step_time_s(StepShape((1,) * slots, (min_kv,) * slots))
  budget = engine.token_budget
  t_full = min(model.step_time_s(StepShape((budget,), (budget,))),
               model.step_time_s(StepShape((1,) * budget, (1,) * budget)))
  return float(min(slots / (output * t_decode), budget / ((prompt + output - 1) * t_full)))


class _Probe:
  """Simulates one candidate at snapped rates; results kept in `cache` (shared across plans)."""

  def __init__(self, cand: Candidate, model: StepTimeModel, cfg: PlanConfig, cache: dict):
    self.cand, self.model, self.cfg, self.cache = cand, model, cfg, cache
    self.replica = simulator.ReplicaConfig.from_engine(cand.engine, model)

  def __call__(self, rate: float) -> dict:
    grid = snap(rate, self.cfg.tolerance)
    key = (self.cand, self.cfg.workload, grid)
    if key not in self.cache:
      _count(self.cache)
      specs = workload.build(workload.with_rate(self.cfg.workload, grid))
      self.cache[key] = simulator.simulate(specs, [self.replica]).records
    check = self.cfg.slo.check(self.cache[key])
    return {'passed': check['passed'], 'grid_rate': grid, 'values': check['values'], 'failed': check['failed']}


def _count(cache: dict) -> None:
  cache['simulations'] = cache.get('simulations', 0) + 1


def saturated_rps(cand: Candidate, model: StepTimeModel, cfg: PlanConfig, cache: dict) -> float:
  """Requests/s the replica sustains when requests queue: every request arrives at once (SATURATION x
  max_seqs of them), and output tokens/s between the first token of the max_seqs-th request to start (the
  batch is full) and that of the last (the queue is empty) are divided by the mean output length."""
  n = max(cfg.workload.requests, SATURATION * cand.engine.max_seqs)
  wl = dataclasses.replace(cfg.workload, rate=math.inf, requests=n)
  key = ('saturated', cand, wl)
  if key in cache:
    return cache[key]
  _count(cache)
  replica = simulator.ReplicaConfig.from_engine(cand.engine, model, max_waiting=n)
  records = [r for r in simulator.simulate(workload.build(wl), [replica]).records if r.ok]
  firsts = sorted(r.token_offsets_us[0] for r in records)
  lo, hi = firsts[min(cand.engine.max_seqs, len(firsts) // SATURATION)], firsts[-1]
  tokens = sum(lo < t <= hi for r in records for t in r.token_offsets_us)
  # no queue formed (inf): the search's ceiling is the throughput bound
  cache[key] = (tokens / ((hi - lo) / 1e6) / float(np.mean([r.max_tokens for r in records]))
                if hi > lo and tokens else math.inf)
  return cache[key]


def evaluate(cand: Candidate, cfg: PlanConfig, specs, cache: dict) -> dict:
  """The candidate's capacity (None when the run at FLOOR x its throughput bound fails: that is probed first, and
  when it fails nothing more is simulated), its probes in the order run, and the SLO values at capacity and
  at that lowest rate."""
  model = cand.hardware.step_model(cand.tp, cand.engine)
  bound = throughput_bound(model, cand.engine, specs)
  probe = _Probe(cand, model, cfg, cache)
  lo = snap(FLOOR * bound, cfg.tolerance)
  curve = [{**probe(lo), 'rate': lo}]
  saturated, hi, found = None, None, None
  if curve[0]['passed']:
    saturated = saturated_rps(cand, model, cfg, cache)
    hi = max(lo, snap(min(bound, saturated), cfg.tolerance))
    search = capacity.SearchConfig(start_rate=max(lo, snap(START * hi, cfg.tolerance)), min_rate=lo, max_rate=hi,
                                   tolerance=cfg.tolerance, max_probes=16)
    found, more = capacity.search(probe, search)
    curve += more
  best = None if found is None else next(p for p in curve[1:] if p['passed'] and p['rate'] == found)
  lowest = curve[0]
  return {**cand.describe(), 'bound_rps': bound, 'saturated_rps': saturated if saturated != math.inf else None,
          'ceiling_rps': hi, 'capacity_rps': best['grid_rate'] if best else None,
          'at_ceiling': bool(best and best['grid_rate'] >= hi),
          'values_at_capacity': best['values'] if best else None,
          'lowest_rate': lowest['grid_rate'], 'values_at_lowest': lowest['values'],
          'probes': [{k: p[k] for k in ('grid_rate', 'passed', 'values')} for p in curve]}


def _cost(result: dict, target: float | None) -> float | None:
  if target is None or not result['capacity_rps']:
    return None
  return math.ceil(target / result['capacity_rps'] - 1e-9) * result['price_usd_per_hour']


def check_replicas(cand: Candidate, cfg: PlanConfig, replicas: int, cache: dict) -> list[dict]:
  """Simulates `replicas` replicas behind the router at the target rate (the workload scaled to keep each
  replica's share), adding replicas while the SLO fails; each run's verdict."""
  model = cand.hardware.step_model(cand.tp, cand.engine)
  runs = []
  for n in range(replicas, replicas + MAX_EXTRA_REPLICAS + 1):
    wl = dataclasses.replace(cfg.workload, rate=cfg.target_qps, requests=cfg.workload.requests * n)
    _count(cache)
    result = simulator.simulate(workload.build(wl), [simulator.ReplicaConfig.from_engine(cand.engine, model)] * n,
                                cfg.router)
    check = cfg.slo.check(result.records)
    runs.append({'replicas': n, 'requests': wl.requests, 'passed': check['passed'], 'values': check['values'],
                 'wall_s': result.wall_s})
    if check['passed']:
      break
  return runs


def plan(hardware: Sequence[Hardware], cfg: PlanConfig, cache: dict | None = None, log=print) -> dict:
  """Searches every candidate (pruned as the module docstring says); returns the plan (see plan_report)."""
  start = time.perf_counter()
  cache = {} if cache is None else cache
  simulations_before = cache.get('simulations', 0)
  specs = workload.build(workload.with_rate(cfg.workload, 1.0))
  cands, skipped = plan_space.candidates(hardware, cfg.max_seqs, cfg.token_budgets, cfg.page_size,
                                         plan_space.longest_request(cfg.workload))
  if not cands:
    raise ValueError('plan: no configuration fits in memory, e.g. ' + '; '.join(
        f'{s["device"]} x{s["tp"]} max_seqs {s["max_seqs"]}: {s["reason"]}' for s in skipped[:3]) +
        '. Shorten the workload\'s requests or give devices with more memory.')
  ceilings = {c: throughput_bound(c.hardware.step_model(c.tp, c.engine), c.engine, specs)
              for c in cands}
  order = sorted(cands, key=lambda c: -ceilings[c] / c.price_usd_per_hour)
  results, pruned = [], []
  best_per_usd, best_cost = 0.0, math.inf
  for cand in order:
    ceiling = ceilings[cand]
    ceiling_cost = _cost({'capacity_rps': ceiling, 'price_usd_per_hour': cand.price_usd_per_hour}, cfg.target_qps)
    if cfg.prune and ceiling / cand.price_usd_per_hour < best_per_usd and (
        ceiling_cost is None or ceiling_cost > best_cost):
      pruned.append({**cand.describe(), 'ceiling_rps': ceiling})
      continue
    result = evaluate(cand, cfg, specs, cache)
    result['candidate'] = cand
    results.append(result)
    if result['capacity_rps']:
      best_per_usd = max(best_per_usd, result['capacity_rps'] / cand.price_usd_per_hour)
      best_cost = min(best_cost, _cost(result, cfg.target_qps) or math.inf)
    log(f'  {cand.hardware.name} x{cand.tp} max_seqs={cand.engine.max_seqs} token_budget='
        f'{cand.engine.token_budget}: capacity '
        f'{"none" if result["capacity_rps"] is None else format(result["capacity_rps"], ".3g") + " req/s"} '
        f'({len(result["probes"])} simulated loads)')
  feasible = [r for r in results if r['capacity_rps']]
  if not feasible:
    best = {t.metric: min((r['values_at_lowest'][t.metric] for r in results
                           if r['values_at_lowest'][t.metric] is not None), default=None) for t in cfg.slo.targets}
    raise ImpossibleSLO(
        f'the SLO {cfg.slo} cannot be met by any of the {len(results)} configurations searched, even at the '
        f'lowest load tried ({FLOOR:g} of each one\'s throughput bound). Best achievable: ' +
        ', '.join(f'{t.metric}_p{t.quantile * 100:g} = {best[t.metric]:.4g}s' if best[t.metric] is not None else
                  f'{t.metric}: undefined' for t in cfg.slo.targets) + '. Loosen the SLO or shorten the workload.',
        best, results)
  for r in results:
    r['requests_per_usd'] = r['capacity_rps'] * 3600 / r['price_usd_per_hour'] if r['capacity_rps'] else 0.0
    if cfg.target_qps:
      r['replicas'] = math.ceil(cfg.target_qps / r['capacity_rps'] - 1e-9) if r['capacity_rps'] else None
      r['cost_usd_per_hour'] = _cost(r, cfg.target_qps)
  ranked = sorted(results, key=lambda r: -r['requests_per_usd'])
  if cfg.target_qps:
    chosen = min(feasible, key=lambda r: (r['cost_usd_per_hour'], -r['requests_per_usd']))
    chosen['check'] = check_replicas(chosen['candidate'], cfg, chosen['replicas'], cache)
    chosen['replicas_checked'] = chosen['check'][-1]['replicas'] if chosen['check'][-1]['passed'] else None
  else:
    chosen = ranked[0]
  return {'slo': str(cfg.slo), 'workload': dataclasses.asdict(cfg.workload), 'target_qps': cfg.target_qps,
          'tolerance': cfg.tolerance, 'ranked': ranked, 'chosen': chosen, 'pruned': pruned, 'skipped': skipped,
          'simulations': cache.get('simulations', 0) - simulations_before, 'plan_s': time.perf_counter() - start}
