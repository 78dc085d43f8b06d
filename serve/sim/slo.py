"""Latency SLOs written as strings ('ttft_p90<2s,tbt_p99<200ms') and their verdict on a run's records.

Each item is METRIC_pQ<VALUE[UNIT]: the Q-th percentile over the run of METRIC must be at most VALUE (as
the benchmark judges, '<' and '<=' mean the same). ttft and tbt are the benchmark's own (serve.bench.analysis.SLO,
kind 'latency': TTFT per request, TBT over every gap after a request's first token); tpot (mean gap after the
first token, per request) and e2e (request latency), which that SLO has no field for, come from the same metric
functions (serve.bench.metrics). As in the benchmark, a run with any failed request fails every target.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from serve.bench import analysis
from serve.bench import metrics as m
from serve.bench.client import RequestRecord

METRICS = ('ttft', 'tbt', 'tpot', 'e2e')
UNITS = {'s': 1.0, 'ms': 1e-3, 'us': 1e-6}
GRAMMAR = ("comma-separated METRIC_pQ<VALUE[UNIT] items: METRIC one of ttft, tbt, tpot, e2e; Q a percentile "
           "in (0, 100]; UNIT s (default), ms or us. Example: 'ttft_p90<2s,tbt_p99<200ms'")
_ITEM = re.compile(r'^(?P<metric>[a-z0-9]+)_p(?P<q>\d+(?:\.\d+)?)\s*<=?\s*(?P<value>\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+)'
                   r'\s*(?P<unit>[a-z]*)$')


@dataclasses.dataclass(frozen=True)
class Target:
  metric: str  # one of METRICS
  quantile: float  # in (0, 1]
  limit_s: float

  def __str__(self):
    return f'{self.metric}_p{self.quantile * 100:g}<{self.limit_s:g}s'


@dataclasses.dataclass(frozen=True)
class LatencySLO:
  """Targets on latency quantiles, at most one per metric."""
  targets: tuple[Target, ...]

  def __str__(self):
    return ','.join(map(str, self.targets))

  def target(self, metric: str) -> Target | None:
    return next((t for t in self.targets if t.metric == metric), None)

  def bench_slo(self) -> analysis.SLO:
    """The benchmark's SLO for the ttft/tbt targets (`stoker bench --slo latency`); request_rows takes it."""
    ttft, tbt = self.target('ttft'), self.target('tbt')
    kwargs = {}
    if ttft:
      kwargs.update(ttft_target_s=ttft.limit_s, ttft_quantile=ttft.quantile)
    if tbt:
      kwargs.update(tbt_target_s=tbt.limit_s, tbt_quantile=tbt.quantile)
    if not kwargs:  # only tpot/e2e targets: the SLO still needs one; an infinite TTFT target never fails
      kwargs['ttft_target_s'] = float('inf')
    return analysis.SLO(kind='latency', **kwargs)

  def values(self, records: Sequence[RequestRecord]) -> dict[str, float | None]:
    """Each target's metric at its quantile over the run's successful requests (None where none defines it),
    from the benchmark's metric functions as analysis.request_rows / summarize apply them."""
    gaps = [g for g in (m.gaps_us(r.token_offsets_us) for r in records if r.ok) if g]
    per_metric = {'ttft': lambda: [m.ttft_s(g) for g in gaps],
                  'tbt': lambda: [x for g in gaps for x in m.tbt_s(g)],
                  'tpot': lambda: [m.tpot_s(g) for g in gaps if len(g) > 1],
                  'e2e': lambda: [m.e2e_s(g) for g in gaps]}
    out = {}
    for t in self.targets:
      xs = per_metric[t.metric]()
      out[t.metric] = float(np.quantile(np.asarray(xs, np.float64), t.quantile)) if xs else None
    return out

  def check(self, records: Sequence[RequestRecord]) -> dict:
    """{'passed', 'values': metric -> value, 'failed': [metric, ...]} for a run's records.

    As analysis.summarize judges a run: a target fails when its value is undefined (no request defines the
    metric, e.g. TBT when every request has one output token) or above the limit, and every target fails
    when any request failed.
    """
    values = self.values(records)
    any_failed = any(not r.ok for r in records)
    failed = [t.metric for t in self.targets
              if any_failed or values[t.metric] is None or values[t.metric] > t.limit_s]
    return {'passed': not failed, 'values': values, 'failed': failed}


def parse(text: str) -> LatencySLO:
  """LatencySLO from 'ttft_p90<2s,tbt_p99<0.2s'; ValueError naming the bad item and showing the grammar."""
  items = [s.strip() for s in text.split(',') if s.strip()]
  if not items:
    raise ValueError(f'--slo {text!r} is empty: give {GRAMMAR}.')
  targets = []
  for item in items:
    match = _ITEM.match(item.lower())
    bad = None
    if not match:
      bad = 'not METRIC_pQ<VALUE[UNIT]'
    elif match['metric'] not in METRICS:
      bad = f'unknown metric {match["metric"]!r}'
    elif not 0 < float(match['q']) <= 100:
      bad = f'percentile {match["q"]} is not in (0, 100]'
    elif match['unit'] not in ('', *UNITS):
      bad = f'unknown unit {match["unit"]!r}'
    elif not float(match['value']) > 0:
      bad = 'the limit must be > 0'
    elif any(t.metric == match['metric'] for t in targets):
      bad = f'a second target for {match["metric"]}'
    if bad:
      raise ValueError(f'--slo item {item!r}: {bad}. Give {GRAMMAR}.')
    targets.append(Target(match['metric'], round(float(match['q']) / 100, 12),
                          float(match['value']) * UNITS[match['unit'] or 's']))
  return LatencySLO(tuple(targets))
