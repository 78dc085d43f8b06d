"""User-experience metrics of a serving benchmark (Etalon, arXiv 2407.07000): pure functions.

A request's stream is its inter-token times: the first from the moment the request was sent (the TTFT),
each later one the gap since the token before. A chunk that carries k tokens gives one gap and k-1 zeros.
Times are integer microseconds: deadline arithmetic floors (t - slack) // D, and in floats
(0.3 - 0.1) // 0.1 == 1.0 where the exact answer is 2, so everything here that floors is done in ints.

fluidity-index (per request): every token has a deadline, D_p for the first and D_d for each later one.
A token that beats its deadline banks the time it saved as slack for the next ones; a late token misses
every deadline slot that passed while it was awaited (1 + (t - slack - D_p) // D_d for the first token,
(t - slack) // D_d for a later one) and the slack is spent. fluidity = 1 - missed slots / all slots.
An early stall therefore costs more than a late one, which banked slack can absorb.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

US_PER_S = 1_000_000
TARGET_MISS_RATE = 0.1  # Etalon's per-request miss-rate target
QUANTILE = 0.99  # Etalon's quantile over requests


def to_us(seconds: float) -> int:
  """Seconds to integer microseconds, rounded to the nearest (0.3 -> 300000, never 299999)."""
  if not math.isfinite(seconds):
    raise ValueError(f'time {seconds!r} s is not finite: give a finite number of seconds.')
  return int(round(seconds * US_PER_S))


def gaps_us(token_offsets_us: Sequence[int]) -> list[int]:
  """Inter-token times from each token's arrival time (us since the request was sent).

  Tokens of one chunk share an arrival time, so they give one gap and zeros. Offsets must not decrease.
  """
  gaps, before = [], 0
  for i, t in enumerate(token_offsets_us):
    if t < before:
      raise ValueError(f'token {i} arrived at {t} us, before token {i - 1} ({before} us) or the send '
                       '(0 us): token times must be non-decreasing offsets from the send.')
    gaps.append(int(t) - before)
    before = int(t)
  return gaps


def deadline_slots(gaps: Sequence[int], prefill_deadline_us: int, decode_deadline_us: int,
                   ignore_first: bool = False) -> tuple[int, int]:
  """(missed, total) deadline slots of one stream of inter-token times (all integer us).

  ignore_first: skip the first token (its time and its slot), as the fluid token generation rate does.
  """
  if decode_deadline_us <= 0 or (prefill_deadline_us <= 0 and not ignore_first):
    raise ValueError(f'deadlines D_p={prefill_deadline_us} us, D_d={decode_deadline_us} us: '
                     'both must be positive integers of microseconds.')
  missed = total = slack = 0
  for i, t in enumerate(gaps):
    if i == 0 and ignore_first:
      continue
    deadline = prefill_deadline_us if i == 0 else decode_deadline_us
    if t <= deadline + slack:
      slack += deadline - t
      total += 1
      continue
    if i == 0:
      misses = 1 + (t - slack - prefill_deadline_us) // decode_deadline_us
    else:
      misses = (t - slack) // decode_deadline_us
    missed += misses
    total += misses
    slack = 0
  return missed, total


def miss_rate(gaps: Sequence[int], prefill_deadline_us: int, decode_deadline_us: int,
              ignore_first: bool = False) -> float:
  """Missed / total deadline slots; 0.0 for a stream with no slots."""
  missed, total = deadline_slots(gaps, prefill_deadline_us, decode_deadline_us, ignore_first)
  return missed / total if total else 0.0


def fluidity_index(gaps: Sequence[int], prefill_deadline_us: int, decode_deadline_us: int) -> float:
  """1 - miss rate: the share of deadline slots in which the reader had the token it was waiting for."""
  return 1.0 - miss_rate(gaps, prefill_deadline_us, decode_deadline_us)


def min_decode_deadline_us(gaps: Sequence[int], target_miss_rate: float = TARGET_MISS_RATE) -> int | None:
  """The smallest D_d (us) whose miss rate, first token ignored, is <= target; None without later tokens.

  Binary search over integer microseconds, as Etalon searches: D_d = the largest gap misses nothing.
  """
  if len(gaps) < 2:
    return None
  lo, hi = 1, max(1, max(gaps[1:]))
  while lo < hi:
    mid = (lo + hi) // 2
    if miss_rate(gaps, 0, mid, ignore_first=True) <= target_miss_rate:
      hi = mid
    else:
      lo = mid + 1
  return lo


def fluid_token_generation_rate(min_deadlines_us: Sequence[int | None],
                                quantile: float = QUANTILE) -> float | None:
  """Tokens/s = 1 / (the `quantile` over requests of each one's smallest D_d meeting the target)."""
  values = [d for d in min_deadlines_us if d is not None]
  if not values:
    return None
  return US_PER_S / float(np.quantile(np.asarray(values, np.float64), quantile))


def quantile_miss_rate_at(gaps_per_request: Sequence[Sequence[int]], decode_deadline_us: int,
                          quantile: float = QUANTILE) -> float:
  """The `quantile` over requests of the miss rate at D_d, first token ignored (the miss-rate curve)."""
  rates = [miss_rate(g, 0, decode_deadline_us, ignore_first=True) for g in gaps_per_request]
  return float(np.quantile(np.asarray(rates, np.float64), quantile)) if rates else float('nan')


# Per-request latency metrics, in seconds (from integer-us gaps).

def ttft_s(gaps: Sequence[int]) -> float:
  return gaps[0] / US_PER_S


def tbt_s(gaps: Sequence[int]) -> list[float]:
  return [g / US_PER_S for g in gaps[1:]]


def tpot_s(gaps: Sequence[int]) -> float | None:
  """Mean time per output token after the first; None for a one-token stream."""
  return sum(gaps[1:]) / (len(gaps) - 1) / US_PER_S if len(gaps) > 1 else None


def e2e_s(gaps: Sequence[int]) -> float:
  return sum(gaps) / US_PER_S


def normalized_latency_s(gaps: Sequence[int]) -> float:
  """End-to-end latency per output token."""
  return sum(gaps) / len(gaps) / US_PER_S


def output_throughput(gaps: Sequence[int]) -> float | None:
  """Output tokens per second of one request (None if it took no measurable time)."""
  total = sum(gaps)
  return len(gaps) * US_PER_S / total if total else None


def summary(values: Sequence[float | None]) -> dict[str, float | int | None]:
  """mean, P50, P90, P99 (numpy's linear interpolation), min, max and the count of the non-None values."""
  xs = np.asarray([v for v in values if v is not None], np.float64)
  if xs.size == 0:
    return {'count': 0, 'mean': None, 'p50': None, 'p90': None, 'p99': None, 'min': None, 'max': None}
  p50, p90, p99 = np.quantile(xs, [0.5, 0.9, 0.99])
  return {'count': int(xs.size), 'mean': float(xs.mean()), 'p50': float(p50), 'p90': float(p90),
          'p99': float(p99), 'min': float(xs.min()), 'max': float(xs.max())}


# Prefill deadline predicted from prompt length: D_p = predicted prefill time + TTFT slack, the prediction a
# least-squares polynomial (degree <= 2: attention is quadratic in the prompt) through the server's minimum
# TTFT per profiled prompt length.

def fit_prefill(prompt_tokens: Sequence[int], min_ttft_s: Sequence[float]) -> tuple[float, ...]:
  """Polynomial coefficients (highest power first) of min TTFT vs prompt length."""
  if len(prompt_tokens) != len(min_ttft_s) or not prompt_tokens:
    raise ValueError(f'prefill profile: {len(prompt_tokens)} prompt lengths and {len(min_ttft_s)} TTFTs; '
                     'give one minimum TTFT per profiled length, at least one.')
  degree = min(2, len(set(prompt_tokens)) - 1)
  return tuple(float(c) for c in np.polyfit(np.asarray(prompt_tokens, np.float64),
                                            np.asarray(min_ttft_s, np.float64), degree))


def predict_prefill_s(coefficients: Sequence[float], prompt_tokens: int) -> float:
  """The fitted prefill time, never below 0."""
  return max(0.0, float(np.polyval(np.asarray(coefficients, np.float64), float(prompt_tokens))))
