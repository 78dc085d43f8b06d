"""The step-time estimator fitted on an engine profile (`stoker profile`, serve/sim/profile.py).

The engine runs one compiled program per token bucket (EngineConfig.buckets()), padding each step's
tokens to the smallest bucket that holds them. The model mirrors that:
  step_time_s = bucket_s[T] + [P > T] * after_s[P] + sum(coef[f] * f for f in LINEAR)
with T the step's bucket and per-bucket costs bucket_s (every matmul, and on the pure-JAX reference
attention the gathered T x M*G key/value block, scale with T, not with the real tokens); P the bucket
of the step before (StepShape.prev_tokens) and after_s[P] what a step pays for following a larger one
(on a CPU the first decode after a 256-token step ran 7-8 ms slower, of 17-25; on an H100 ~0.3 of 20;
measured on decodes, the profile's 'after' rows, and charged to any smaller step); plus linear terms in
physical quantities of the step (StepShape):
  tokens       real tokens: host-side buffers, KV writes
  num_seqs     scheduled sequences: per-sequence host work (scheduler, block tables)
  num_decodes  decodes among them (sampled every step)
  attn_qk      sum of q_len * kv_len: attention work of kernels that skip masked blocks
  kv_tokens    sum of kv_len: KV bytes a paged kernel reads
  gathered     keys the CPU's tiled attention gathers (serve/kernels/tiled.py): its tiles for the
               bucket times the table width that holds the step's longest sequence
Fit: least squares with non-negative coefficients (scikit-learn LinearRegression(positive=True)),
weighted by 1/wall^2 so it fits relative error; then bucket and after costs are made non-decreasing
in their bucket (a running maximum). Why this and not boosted trees: every term is a cost that only
adds time, so the prediction is monotone (more tokens, sequences or context is never faster) and
extrapolates linearly in context and batch, as the hardware does, where trees go flat outside the grid
(on the tiny CPU profile trees also cross-validate no better: p90 8% against 6%). Past the largest bucket
(a token budget beyond the profiled one), the largest bucket's cost is scaled by T / T_last.
K-fold cross-validated relative error is in `ProfiledModel.cv_error`. Those are busy steps; how much
slower steps run after the machine idled (wake.csv) is `ProfiledModel.wake` (serve/sim/wake.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from typing import Sequence

import numpy as np
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import KFold

import storage
from serve.engine import EngineConfig
from serve.kernels import tiled
from serve.sim.roofline import padded_tokens
from serve.sim import wake as wake_lib
from serve.sim.shape import StepShape

LINEAR = ('tokens', 'num_seqs', 'num_decodes', 'attn_qk', 'kv_tokens', 'gathered')
FILES = ('steps.csv', 'host.csv', 'meta.json')
_REQUIRED = ('kind', 'q_lens', 'kv_lens', 'wall_s', 'device_s')


@dataclasses.dataclass(frozen=True)
class Profile:
  """One `stoker profile` directory: step rows (shape, wall_s, device_s), host rows, meta.json."""

  path: str
  shapes: tuple[StepShape, ...]
  kinds: tuple[str, ...]
  wall_s: np.ndarray
  device_s: np.ndarray
  host: tuple[dict, ...]
  meta: dict
  wake: tuple[dict, ...] = ()  # wake.csv's rows (serve/sim/wake.py); () for a profile without it

  @property
  def engine(self) -> EngineConfig:
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in self.meta['engine'].items() if k in fields})


def _missing(path: str, what: str) -> str:
  return (f'no engine profile at {path} ({what}); make one with `stoker profile --out {path}` '
          f'(serve/sim/profiles/tiny_cpu is the shipped tiny CPU profile).')


def load_profile(path: str) -> Profile:
  """Reads a profile directory (local, gs:// or s3://). FileNotFoundError if it or a file is missing,
  ValueError if a file is incomplete; both name the path and the command that makes one. An unusable
  bucket (missing, unreachable, no access) is a StorageError naming the fix."""
  storage.check(path)
  if not storage.isdir(path):
    raise FileNotFoundError(_missing(path, 'no such directory'))
  for name in FILES:
    if not storage.isfile(storage.join(path, name)):
      raise FileNotFoundError(_missing(path, f'{name} is missing'))
  with storage.open(storage.join(path, 'meta.json')) as f:
    meta = json.load(f)
  if 'engine' not in meta or 'model' not in meta:
    raise ValueError(_missing(path, 'meta.json lacks the engine or model config'))
  with storage.open(storage.join(path, 'steps.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  with storage.open(storage.join(path, 'host.csv'), newline='') as f:
    host = tuple({k: float(v) for k, v in row.items()} for row in csv.DictReader(f))
  if len(rows) < 3 or any(k not in rows[0] for k in _REQUIRED):
    raise ValueError(_missing(path, f'steps.csv has {len(rows)} rows, needs >= 3 with columns '
                                    f'{_REQUIRED}'))
  try:
    shapes = tuple(StepShape(tuple(int(x) for x in r['q_lens'].split(';')),
                             tuple(int(x) for x in r['kv_lens'].split(';')),
                             int(r.get('prev_tokens') or 0)) for r in rows)  # older profiles lack it
    wall, device = (np.array([float(r[k]) for r in rows]) for k in ('wall_s', 'device_s'))
  except (TypeError, ValueError) as e:
    raise ValueError(_missing(path, f'steps.csv does not parse: {e}')) from None
  if (wall <= 0).any():
    raise ValueError(_missing(path, 'steps.csv has non-positive wall_s'))
  wake_csv, wake = storage.join(path, 'wake.csv'), ()
  if storage.isfile(wake_csv):  # optional: profiles before it run as always busy
    with storage.open(wake_csv, newline='') as f:
      wake = tuple(csv.DictReader(f))
  return Profile(path, shapes, tuple(r['kind'] for r in rows), wall, device, host, meta, wake)


def features(shape: StepShape, engine: EngineConfig) -> np.ndarray:
  """The LINEAR features of a step on `engine`."""
  q, kv = np.array(shape.q_lens, np.float64), np.array(shape.kv_lens, np.float64)
  return np.array([q.sum(), len(q), shape.num_decodes, (q * kv).sum(), kv.sum(),
                   gathered_keys(shape, engine)])


def gathered_keys(shape: StepShape, engine: EngineConfig) -> float:
  """Keys (and as many values) the tiled attention gathers per layer for this step: every tile
  (one when the step holds one sequence) reads the narrowest table width that holds the step's
  longest sequence."""
  buckets = engine.buckets()
  T = min(padded_tokens(shape.num_tokens, buckets), buckets[-1])
  B, M, G = engine.max_seqs, engine.max_pages_per_seq, engine.page_size
  _, tiles = tiled.tiles(T, B, len(shape.q_lens))
  pages = -(-max(shape.kv_lens) // G)
  width = next((w for w in tiled.table_widths(M) if w >= pages), M)
  return float(tiles * width * G)


def _after(shape: StepShape, buckets: Sequence[int]) -> int | None:
  """The bucket of the step before, where it is larger than this step's; else None."""
  if not shape.prev_tokens:
    return None
  prev = min(padded_tokens(shape.prev_tokens, buckets), buckets[-1])
  return prev if prev > padded_tokens(shape.num_tokens, buckets) else None


def _design(shapes: Sequence[StepShape], engine: EngineConfig) -> np.ndarray:
  """One column per bucket (1 where the step runs in it), one per bucket of a larger step before (1 where
  one was), then the LINEAR features."""
  buckets = engine.buckets()
  onehot = [[float(padded_tokens(s.num_tokens, buckets) == b) for b in buckets] +
            [float(_after(s, buckets) == b) for b in buckets] for s in shapes]
  return np.hstack([np.array(onehot).reshape(len(shapes), 2 * len(buckets)),
                    np.stack([features(s, engine) for s in shapes])])


def _fit(X: np.ndarray, y: np.ndarray, num_buckets: int) -> np.ndarray:
  """Non-negative coefficients minimising relative squared error (features scaled to ~1 first;
  a positive scale keeps each coefficient's sign); bucket and after costs then made non-decreasing (a
  bucket absent from the training rows takes the one below it)."""
  scale = np.abs(X).max(axis=0)
  scale[scale == 0] = 1.0
  reg = LinearRegression(positive=True, fit_intercept=False)
  reg.fit(X / scale, y, sample_weight=1.0 / y ** 2)
  coef = reg.coef_ / scale
  for block in (slice(0, num_buckets), slice(num_buckets, 2 * num_buckets)):
    coef[block] = np.maximum.accumulate(coef[block])
  return coef


@dataclasses.dataclass(frozen=True)
class ProfiledModel:
  """A StepTimeModel from a profile: seconds of one engine iteration, valid for `engine` (the
  config profiled: its buckets, max_seqs and block table shape the costs) on `device_kind`."""

  bucket_s: tuple[float, ...]  # fixed cost of each of engine.buckets()
  after_s: tuple[float, ...]  # cost of following a step of each of engine.buckets() (when it is larger)
  coef: tuple[float, ...]  # seconds per unit of each LINEAR feature
  engine: EngineConfig
  cv_error: dict  # median and p90 relative error of K-fold predictions; folds; rows
  device_kind: str
  path: str
  wake: wake_lib.Wake | None = None  # the slowdown after idle (serve/sim/wake.py); None: always busy

  def step_time_s(self, shape: StepShape) -> float:
    buckets = self.engine.buckets()
    T = padded_tokens(shape.num_tokens, buckets)
    base = (self.bucket_s[buckets.index(T)] if T in buckets else
            self.bucket_s[-1] * T / buckets[-1])
    prev = _after(shape, buckets)
    after = 0.0 if prev is None else self.after_s[buckets.index(prev)]
    return float(base + after + features(shape, self.engine) @ np.array(self.coef))

  def describe(self) -> str:
    buckets = ', '.join(f'{b}: {1e3 * c:.3g} ms' for b, c in zip(self.engine.buckets(), self.bucket_s))
    after = ', '.join(f'{b}: {1e3 * c:.3g} ms' for b, c in zip(self.engine.buckets(), self.after_s) if c)
    terms = ', '.join(f'{n} {c:.3g}' for n, c in zip(LINEAR, self.coef) if c)
    return (f'{self.path} ({self.device_kind}): step time = per bucket ({buckets})'
            f'{" + after a larger step (" + after + ")" if after else ""}'
            f'{" + " + terms + " (s per unit)" if terms else ""}; {self.cv_error["folds"]}-fold CV '
            f'relative error median {100 * self.cv_error["median"]:.1f}%, p90 '
            f'{100 * self.cv_error["p90"]:.1f}% over {self.cv_error["rows"]} rows'
            f'{"; " + self.wake.describe() if self.wake else ""}')


def fit(profile: Profile, folds: int = 5, seed: int = 0) -> ProfiledModel:
  """Fits the step-time model on a profile's steady-state step times and cross-validates it."""
  buckets = profile.engine.buckets()
  X, y, nb = _design(profile.shapes, profile.engine), profile.wall_s, len(buckets)
  folds = min(folds, len(y))
  pred = np.empty_like(y)
  for train, test in KFold(folds, shuffle=True, random_state=seed).split(X):
    pred[test] = X[test] @ _fit(X[train], y[train], nb)
  rel = np.abs(pred - y) / y
  cv = dict(median=float(np.median(rel)), p90=float(np.quantile(rel, 0.9)), folds=folds,
            rows=len(y))
  coef = [float(c) for c in _fit(X, y, nb)]
  return ProfiledModel(tuple(coef[:nb]), tuple(coef[nb:2 * nb]), tuple(coef[2 * nb:]), profile.engine, cv,
                       profile.meta.get('device_kind', '?'), profile.path, wake_lib.fit(profile.wake))
