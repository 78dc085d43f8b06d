"""Capacity search: the highest arrival rate at which a run still meets the SLO, by binary search.

Each probe runs the same workload (same seed, so the same requests) at one rate and says whether the run
met the SLO. The search first brackets the capacity (doubling the rate from `start_rate` while runs pass,
halving it while they fail), then bisects between the highest passing and the lowest failing rate until
they are within `tolerance` of each other (relative) or `max_probes` runs are spent. Every probe is kept:
the curve of SLO metric and goodput against load.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  start_rate: float = 1.0  # requests/s of the first probe
  min_rate: float = 0.05  # below this: no capacity (None)
  max_rate: float = 256.0  # above this: capacity is max_rate or more
  tolerance: float = 0.1  # stop when (fail - pass) <= tolerance * pass
  max_probes: int = 10

  def __post_init__(self):
    if not 0 < self.min_rate <= self.start_rate <= self.max_rate:
      raise ValueError(f'capacity search rates: need 0 < --min-rate ({self.min_rate}) <= --start-rate '
                       f'({self.start_rate}) <= --max-rate ({self.max_rate}).')
    if not 0 < self.tolerance < 1 or self.max_probes < 2:
      raise ValueError(f'capacity search: need 0 < --rate-tolerance ({self.tolerance}) < 1 and '
                       f'--max-probes ({self.max_probes}) >= 2.')


def search(probe: Callable[[float], dict], cfg: SearchConfig) -> tuple[float | None, list[dict]]:
  """(capacity, curve). probe(rate) runs the workload at `rate` and returns a dict with a bool 'passed';
  the curve is those dicts (with 'rate' added) in the order run. capacity: the highest passing rate, or
  None if even min_rate fails."""
  curve = []

  def run(rate: float) -> bool:
    result = dict(probe(rate))
    result['rate'] = rate
    curve.append(result)
    return bool(result['passed'])

  passed, failed = None, None  # highest passing, lowest failing rate
  rate = cfg.start_rate
  while len(curve) < cfg.max_probes:  # bracket
    if run(rate):
      passed = rate
      if failed is not None or rate >= cfg.max_rate:
        break
      rate = min(rate * 2, cfg.max_rate)
    else:
      failed = rate
      if passed is not None or rate <= cfg.min_rate:
        break
      rate = max(rate / 2, cfg.min_rate)
  while (passed is not None and failed is not None and len(curve) < cfg.max_probes
         and failed - passed > cfg.tolerance * passed):  # bisect
    rate = (passed + failed) / 2
    if run(rate):
      passed = rate
    else:
      failed = rate
  return passed, curve
