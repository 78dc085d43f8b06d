"""From a run's request records to per-request metric rows and the run's summary, against an SLO.

A failed request (any error kind) counts as missing every deadline (miss rate 1) and never as good.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from serve.bench import metrics as m
from serve.bench.client import RequestRecord

SLO_KINDS = ('deadline', 'latency')
CURVE_POINTS = 32


@dataclasses.dataclass(frozen=True)
class SLO:
  """Deadlines and the service-level objective a run is judged by.

  kind 'deadline' (Etalon): the `quantile` over requests of the miss rate must be <= max_miss_rate.
  kind 'latency': the ttft_quantile of TTFT over requests <= ttft_target_s and the tbt_quantile of every
  gap after a first token <= tbt_target_s (those given). The prefill deadline is prefill_deadline_s, or
  with prefill_profile (min TTFT vs prompt length, polynomial coefficients) the predicted prefill time of
  the request's prompt plus ttft_slack_s.
  """
  decode_deadline_s: float = 0.1
  prefill_deadline_s: float = 1.0
  prefill_profile: tuple[float, ...] | None = None
  ttft_slack_s: float = 0.0
  kind: str = 'deadline'
  max_miss_rate: float = m.TARGET_MISS_RATE
  quantile: float = m.QUANTILE
  ttft_target_s: float | None = None
  ttft_quantile: float = 0.9
  tbt_target_s: float | None = None
  tbt_quantile: float = 0.99

  def __post_init__(self):
    if self.kind not in SLO_KINDS:
      raise ValueError(f'--slo {self.kind!r}: use one of {", ".join(SLO_KINDS)}.')
    if self.kind == 'latency' and self.ttft_target_s is None and self.tbt_target_s is None:
      raise ValueError('--slo latency needs --ttft-target and/or --tbt-target (seconds).')
    for name in ('decode_deadline_s', 'prefill_deadline_s'):
      if m.to_us(getattr(self, name)) < 1:
        raise ValueError(f'{name}={getattr(self, name)}: give at least 1e-6 s.')
    for name in ('quantile', 'ttft_quantile', 'tbt_quantile', 'max_miss_rate'):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f'{name}={getattr(self, name)}: give a fraction in [0, 1].')

  def prefill_deadline_us(self, prompt_tokens: int) -> int:
    if self.prefill_profile is None:
      return m.to_us(self.prefill_deadline_s)
    return max(1, m.to_us(m.predict_prefill_s(self.prefill_profile, prompt_tokens) + self.ttft_slack_s))

  def describe(self) -> dict:
    out = dataclasses.asdict(self)
    if self.prefill_profile is not None:
      out['prefill_deadline_s'] = 'predicted from prefill_profile + ttft_slack_s'
    return out


def _quantile(values, q) -> float | None:
  return float(np.quantile(np.asarray(values, np.float64), q)) if len(values) else None


def request_rows(records: Sequence[RequestRecord], slo: SLO) -> list[dict]:
  """One row per request: what was asked, what happened, and its metrics (None where undefined)."""
  rows = []
  for r in records:
    row = {'index': r.index, 'arrival_s': r.arrival_s, 'sent_s': r.sent_us / m.US_PER_S,
           'prompt_tokens': r.prompt_tokens, 'prompt_tokens_reported': r.prompt_tokens_reported,
           'max_tokens': r.max_tokens, 'output_tokens': len(r.token_offsets_us),
           'output_tokens_reported': r.output_tokens_reported, 'finish_reason': r.finish_reason,
           'status': r.status, 'error': r.error, 'error_message': r.error_message}
    gaps = m.gaps_us(r.token_offsets_us) if r.ok else []
    d_p = slo.prefill_deadline_us(r.prompt_tokens_reported or r.prompt_tokens)
    d_d = m.to_us(slo.decode_deadline_s)
    missed, total = m.deadline_slots(gaps, d_p, d_d) if gaps else (None, None)
    min_dd = m.min_decode_deadline_us(gaps) if gaps else None
    row.update({
        'ttft_s': m.ttft_s(gaps) if gaps else None,
        'tpot_s': m.tpot_s(gaps) if gaps else None,
        'e2e_s': m.e2e_s(gaps) if gaps else None,
        'normalized_latency_s': m.normalized_latency_s(gaps) if gaps else None,
        'output_throughput': m.output_throughput(gaps) if gaps else None,
        'prefill_deadline_s': d_p / m.US_PER_S,
        'missed_slots': missed, 'deadline_slots': total,
        'miss_rate': missed / total if total else (0.0 if gaps else 1.0),
        'fluidity_index': (1 - missed / total if total else 1.0) if gaps else None,
        'min_decode_deadline_s': None if min_dd is None else min_dd / m.US_PER_S,
        'token_times_us': ' '.join(map(str, r.token_offsets_us)),
    })
    tbt_q = _quantile(gaps[1:], slo.tbt_quantile)
    row['meets_slo'] = bool(r.ok and row['miss_rate'] <= slo.max_miss_rate if slo.kind == 'deadline' else
                            r.ok and (slo.ttft_target_s is None or row['ttft_s'] <= slo.ttft_target_s) and
                            (slo.tbt_target_s is None or tbt_q is None or
                             tbt_q / m.US_PER_S <= slo.tbt_target_s))
    rows.append(row)
  return rows


def miss_rate_curve(records: Sequence[RequestRecord], quantile: float, decode_deadline_us: int,
                    points: int = CURVE_POINTS) -> list[dict]:
  """The `quantile` over requests of the miss rate (first token ignored) for D_d on a log grid that
  spans the gaps seen and the configured D_d."""
  gaps = [m.gaps_us(r.token_offsets_us) for r in records if r.ok and len(r.token_offsets_us) > 1]
  later = [g for gs in gaps for g in gs[1:] if g > 0]
  if not later:
    return []
  lo = max(1.0, min(float(np.quantile(later, 0.05)) / 2, decode_deadline_us / 2))
  hi = max(later + [decode_deadline_us]) * 1.25
  grid = sorted({max(1, int(round(d))) for d in np.geomspace(lo, max(hi, lo * 1.01), points)})
  return [{'decode_deadline_s': d / m.US_PER_S, 'miss_rate': m.quantile_miss_rate_at(gaps, d, quantile)}
          for d in grid]


def summarize(records: Sequence[RequestRecord], rows: Sequence[dict], slo: SLO, wall_s: float) -> dict:
  """The run's summary: counts, errors by kind, metric distributions, throughput, SLO verdict, goodput."""
  ok_rows = [row for row in rows if row['error'] is None]
  errors = collections.Counter(row['error'] for row in rows if row['error'] is not None)
  examples = {}
  for row in rows:
    if row['error'] is not None:
      examples.setdefault(row['error'], row['error_message'])
  gaps = [m.gaps_us(r.token_offsets_us) for r in records if r.ok]
  tbt = [g / m.US_PER_S for gs in gaps for g in gs[1:]]
  output_tokens = sum(row['output_tokens'] for row in ok_rows)
  miss_rates = [row['miss_rate'] for row in rows]  # failures count as 1
  missed = sum(row['missed_slots'] or 0 for row in ok_rows)
  slots = sum(row['deadline_slots'] or 0 for row in ok_rows)
  ttfts = [row['ttft_s'] for row in ok_rows]

  checks = {}
  if slo.kind == 'deadline':
    value = _quantile(miss_rates, slo.quantile)
    checks['miss_rate'] = {'quantile': slo.quantile, 'value': value, 'target': slo.max_miss_rate,
                           'passed': value is not None and value <= slo.max_miss_rate}
  else:
    for name, values, target, q in (('ttft_s', ttfts, slo.ttft_target_s, slo.ttft_quantile),
                                    ('tbt_s', tbt, slo.tbt_target_s, slo.tbt_quantile)):
      if target is not None:
        value = _quantile(values, q)
        checks[name] = {'quantile': q, 'value': value, 'target': target,
                        'passed': value is not None and value <= target and not errors}
  good = sum(row['meets_slo'] for row in rows)
  mismatched = sum(1 for row in ok_rows if row['output_tokens_reported'] is not None and
                   row['output_tokens_reported'] != row['output_tokens'])
  return {
      'requests': len(rows), 'completed': len(ok_rows), 'failed': len(rows) - len(ok_rows),
      'errors': dict(sorted(errors.items())), 'error_examples': examples,
      'duration_s': wall_s,
      'request_throughput': len(ok_rows) / wall_s if wall_s else None,
      'output_token_throughput': output_tokens / wall_s if wall_s else None,
      'output_tokens': output_tokens,
      'prompt_tokens': sum(row['prompt_tokens_reported'] or row['prompt_tokens'] for row in ok_rows),
      'token_count_mismatches': mismatched,
      'ttft_s': m.summary(ttfts),
      'tbt_s': m.summary(tbt),
      'tpot_s': m.summary([row['tpot_s'] for row in ok_rows]),
      'e2e_s': m.summary([row['e2e_s'] for row in ok_rows]),
      'normalized_latency_s': m.summary([row['normalized_latency_s'] for row in ok_rows]),
      'output_throughput_per_request': m.summary([row['output_throughput'] for row in ok_rows]),
      'fluidity_index': m.summary([row['fluidity_index'] for row in ok_rows]),
      'miss_rate': m.summary(miss_rates),
      'service_miss_rate': missed / slots if slots else None,
      'fluid_token_generation_rate': m.fluid_token_generation_rate(
          [m.to_us(row['min_decode_deadline_s']) if row['min_decode_deadline_s'] is not None else None
           for row in ok_rows], slo.quantile),
      'slo': {'definition': slo.describe(), 'checks': checks,
              'passed': bool(checks) and all(c['passed'] for c in checks.values())},
      'goodput': good / wall_s if wall_s else None,
      'good_requests': good,
      'miss_rate_vs_decode_deadline': miss_rate_curve(records, slo.quantile, m.to_us(slo.decode_deadline_s)),
  }
