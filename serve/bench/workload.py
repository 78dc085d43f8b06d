"""Benchmark workloads: when each request arrives and how many prompt and output tokens it has. Seeded.

A workload is a WorkloadConfig, written on the command line as comma-separated key=value pairs
(`--workload arrival=gamma,rate=4,burstiness=0.5,prompt=uniform:32:256,output=fixed:64,requests=200`).

Arrivals (requests/s = `rate`): `poisson` (exponential gaps), `gamma` (gamma gaps with shape `burstiness`:
1 is Poisson, below 1 burstier, above 1 steadier; the mean gap stays 1/rate), `fixed` (every 1/rate s;
rate=inf sends all at once), `trace` (the trace CSV's `arrived_at` column, seconds from the start).
Lengths: `fixed:N`, `uniform:LO:HI` (inclusive), `zipf:THETA:LO:HI` (P(n) ~ 1/(n - LO + 1)^THETA on
LO..HI: short ones most common), `trace` (the trace CSV's columns num_prefill_tokens / num_decode_tokens,
rows in file order, wrapping around). Arrivals, prompt and output lengths draw from independent streams
of the seed, so changing one of them leaves the others as they were.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from typing import NamedTuple

import numpy as np

import storage

ARRIVALS = ('poisson', 'gamma', 'fixed', 'trace')
PROMPT_COLUMN, OUTPUT_COLUMN, ARRIVAL_COLUMN = 'num_prefill_tokens', 'num_decode_tokens', 'arrived_at'


class RequestSpec(NamedTuple):
  """One request of a workload: its arrival (s from the start), prompt and output token counts."""
  index: int
  arrival_s: float
  prompt_tokens: int
  output_tokens: int


@dataclasses.dataclass(frozen=True)
class LengthSpec:
  """A token-count distribution: kind 'fixed' | 'uniform' | 'zipf' | 'trace'."""
  kind: str
  low: int = 0
  high: int = 0
  theta: float = 1.0

  @classmethod
  def parse(cls, text: str, name: str) -> LengthSpec:
    parts = text.split(':')
    try:
      if parts[0] == 'fixed' and len(parts) == 2:
        spec = cls('fixed', int(parts[1]), int(parts[1]))
      elif parts[0] == 'uniform' and len(parts) == 3:
        spec = cls('uniform', int(parts[1]), int(parts[2]))
      elif parts[0] == 'zipf' and len(parts) == 4:
        spec = cls('zipf', int(parts[2]), int(parts[3]), float(parts[1]))
      elif parts == ['trace']:
        return cls('trace')
      else:
        raise ValueError
    except ValueError:
      raise ValueError(f'{name}={text!r}: use fixed:N, uniform:LO:HI, zipf:THETA:LO:HI or trace '
                       '(token counts are integers).') from None
    if not 1 <= spec.low <= spec.high or spec.theta <= 0:
      raise ValueError(f'{name}={text!r}: need 1 <= LO <= HI and THETA > 0.')
    return spec

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    if self.kind == 'fixed':
      return np.full(n, self.low, np.int64)
    if self.kind == 'uniform':
      return rng.integers(self.low, self.high + 1, n)
    ranks = np.arange(1, self.high - self.low + 2, dtype=np.float64)
    p = ranks ** -self.theta
    return self.low + rng.choice(ranks.size, n, p=p / p.sum())


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
  requests: int = 100
  arrival: str = 'poisson'
  rate: float = 1.0  # requests/s; inf: all at once
  burstiness: float = 1.0  # gamma shape
  prompt: str = 'uniform:32:256'
  output: str = 'uniform:16:128'
  trace: str | None = None  # CSV with num_prefill_tokens,num_decode_tokens[,arrived_at]
  seed: int = 0

  def __post_init__(self):
    if self.requests < 1:
      raise ValueError(f'workload requests={self.requests}: give at least 1.')
    if self.arrival not in ARRIVALS:
      raise ValueError(f'workload arrival={self.arrival!r}: use one of {", ".join(ARRIVALS)}.')
    if not self.rate > 0:
      raise ValueError(f'workload rate={self.rate}: give requests/s > 0 (inf sends all at once).')
    if not 0 < self.burstiness < math.inf:
      raise ValueError(f'workload burstiness={self.burstiness}: give a finite gamma shape > 0 (1 = Poisson).')
    uses_trace = self.arrival == 'trace' or 'trace' in (self.prompt, self.output)
    if uses_trace and not self.trace:
      raise ValueError('workload uses a trace (arrival=trace or prompt/output=trace) but names none: '
                       'add trace=PATH.csv (columns num_prefill_tokens,num_decode_tokens[,arrived_at]).')
    LengthSpec.parse(self.prompt, 'prompt')
    LengthSpec.parse(self.output, 'output')

  @classmethod
  def parse(cls, text: str, **overrides) -> WorkloadConfig:
    """From 'key=value,key=value' (keys are the field names); `overrides` win."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}
    for item in filter(None, (s.strip() for s in text.split(','))):
      key, eq, value = item.partition('=')
      if not eq or key not in types:
        raise ValueError(f'--workload item {item!r}: use key=value with key one of {", ".join(types)}.')
      try:
        values[key] = (int(value) if key in ('requests', 'seed') else
                       float(value) if key in ('rate', 'burstiness') else value)
      except ValueError:
        raise ValueError(f'--workload {key}={value!r}: not a number.') from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def read_trace(path: str) -> dict[str, np.ndarray]:
  """The trace CSV's columns as arrays, checked (token counts >= 1, arrival times non-decreasing)."""
  try:
    with storage.open(path, newline='') as f:  # local, gs:// or s3://
      rows = list(csv.DictReader(f))
  except FileNotFoundError:
    raise FileNotFoundError(f'trace {path!r}: no such file.') from None
  if not rows or not {PROMPT_COLUMN, OUTPUT_COLUMN} <= set(rows[0]):
    raise ValueError(f'trace {path!r}: needs a header with {PROMPT_COLUMN},{OUTPUT_COLUMN} '
                     f'(optionally {ARRIVAL_COLUMN}) and at least one row.')
  out = {}
  for column in (PROMPT_COLUMN, OUTPUT_COLUMN, ARRIVAL_COLUMN):
    if column not in rows[0]:
      continue
    try:
      out[column] = np.asarray([(float if column == ARRIVAL_COLUMN else int)(float(r[column]))
                                for r in rows])
    except (TypeError, ValueError) as e:
      raise ValueError(f'trace {path!r}: column {column} has a value that is not a number ({e}).') from None
  if (out[PROMPT_COLUMN] < 1).any() or (out[OUTPUT_COLUMN] < 1).any():
    raise ValueError(f'trace {path!r}: token counts must be >= 1.')
  if ARRIVAL_COLUMN in out and (np.diff(out[ARRIVAL_COLUMN]) < 0).any():
    raise ValueError(f'trace {path!r}: {ARRIVAL_COLUMN} must not decrease.')
  return out


def arrivals(cfg: WorkloadConfig, rng: np.random.Generator, trace: dict | None) -> np.ndarray:
  n = cfg.requests
  if cfg.arrival == 'trace':
    if ARRIVAL_COLUMN not in trace:
      raise ValueError(f'arrival=trace: trace {cfg.trace!r} has no {ARRIVAL_COLUMN} column.')
    times = trace[ARRIVAL_COLUMN]
    if n > times.size:
      raise ValueError(f'arrival=trace: {n} requests but the trace has {times.size} rows.')
    return times[:n] - times[0]
  if math.isinf(cfg.rate):
    return np.zeros(n)
  if cfg.arrival == 'fixed':
    gaps = np.full(n, 1.0 / cfg.rate)
  elif cfg.arrival == 'poisson':
    gaps = rng.exponential(1.0 / cfg.rate, n)
  else:
    gaps = rng.gamma(cfg.burstiness, 1.0 / (cfg.rate * cfg.burstiness), n)
  gaps[0] = 0.0  # the first request starts the run
  return np.cumsum(gaps)


def build(cfg: WorkloadConfig) -> list[RequestSpec]:
  """The workload's requests in arrival order. The same config gives the same list."""
  arrival_rng, prompt_rng, output_rng = (np.random.default_rng(s)
                                         for s in np.random.SeedSequence(cfg.seed).spawn(3))
  trace = read_trace(cfg.trace) if cfg.trace else None

  def lengths(text, name, rng, column):
    spec = LengthSpec.parse(text, name)
    if spec.kind == 'trace':
      return np.resize(trace[column], cfg.requests)
    return spec.sample(rng, cfg.requests)

  times = arrivals(cfg, arrival_rng, trace)
  prompts = lengths(cfg.prompt, 'prompt', prompt_rng, PROMPT_COLUMN)
  outputs = lengths(cfg.output, 'output', output_rng, OUTPUT_COLUMN)
  return [RequestSpec(i, float(t), int(p), int(o)) for i, (t, p, o) in enumerate(zip(times, prompts, outputs))]


def with_rate(cfg: WorkloadConfig, rate: float) -> WorkloadConfig:
  """The same workload at another arrival rate (capacity search): same seed, so the same lengths."""
  if cfg.arrival == 'trace':
    raise ValueError('capacity search varies the arrival rate: use arrival=poisson, gamma or fixed, '
                     'not trace (prompt=trace,output=trace keep the trace\'s lengths).')
  return dataclasses.replace(cfg, rate=rate)
