"""The step-time estimator: recovers a known cost function, cross-validates, loads the shipped
profile, and fails clearly on a missing or broken profile."""

import csv
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from models import checkpoint as model_checkpoint
from models import presets
from serve.engine import EngineConfig
from serve.sim import estimator
from serve.sim.shape import StepShape

SHIPPED = os.path.join(os.path.dirname(estimator.__file__), 'profiles', 'tiny_cpu')
ENGINE = EngineConfig(num_pages=256, page_size=16, max_seqs=16, max_pages_per_seq=64,
                      token_budget=256, min_bucket=16)


def true_cost(shape: StepShape) -> float:
  """A known step time: fixed cost, per padded token, per sequence, per attention pair."""
  T = next(b for b in ENGINE.buckets() if b >= shape.num_tokens)
  qk = sum(q * kv for q, kv in zip(shape.q_lens, shape.kv_lens))
  return 2e-3 + 4e-5 * T + 1e-4 * len(shape.q_lens) + 2e-8 * qk


def random_shapes(rng, n):
  shapes = []
  for _ in range(n):
    b = int(rng.integers(0, ENGINE.max_seqs))
    decodes = [(1, int(rng.integers(1, 1000))) for _ in range(b)]
    if rng.random() < 0.5 or not decodes:
      q = int(rng.integers(1, ENGINE.token_budget - b + 1))
      decodes.append((q, q + int(rng.integers(0, 1024 - q))))
    shapes.append(StepShape(*zip(*decodes)))
  return shapes


def write_profile(path, shapes, walls, engine=ENGINE):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'steps.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['kind', 'q_lens', 'kv_lens', 'wall_s', 'device_s', 'prev_tokens'])
    for s, y in zip(shapes, walls):
      w.writerow(['mixed', ';'.join(map(str, s.q_lens)), ';'.join(map(str, s.kv_lens)), y, y, s.prev_tokens])
  with open(os.path.join(path, 'host.csv'), 'w') as f:
    f.write('num_seqs,schedule_s,update_s,host_arrays_s\n1,1e-05,1e-05,1e-05\n')
  meta = dict(engine={k: getattr(v, 'value', v) for k, v in dataclasses.asdict(engine).items()},
              model={}, device_kind='synthetic')
  with open(os.path.join(path, 'meta.json'), 'w') as f:
    json.dump(meta, f)


def test_recovers_a_known_cost_function(tmp_path):
  rng = np.random.default_rng(0)
  shapes = random_shapes(rng, 120)
  noise = 1 + 0.01 * rng.standard_normal(len(shapes))  # 1% timing noise
  write_profile(tmp_path, shapes, [true_cost(s) * e for s, e in zip(shapes, noise)])
  fitted = estimator.fit(estimator.load_profile(str(tmp_path)))
  assert fitted.engine == ENGINE and not any(fitted.after_s)  # no step in it follows a larger one
  held_out = random_shapes(np.random.default_rng(1), 50)
  rel = [abs(fitted.step_time_s(s) / true_cost(s) - 1) for s in held_out]
  assert max(rel) < 0.03, max(rel)
  assert fitted.cv_error['folds'] == 5 and fitted.cv_error['rows'] == 120
  assert fitted.cv_error['median'] < 0.015 and fitted.cv_error['p90'] < 0.03, fitted.cv_error
  assert 'CV relative error median' in fitted.describe()
  # Past the profiled token budget: the largest bucket's cost scaled up, never below it.
  assert fitted.step_time_s(StepShape((512,), (512,))) > fitted.step_time_s(StepShape((256,), (256,)))


def test_recovers_the_cost_of_following_a_larger_step(tmp_path):
  """A step after one of a larger bucket P costs 2e-5 s * P more (StepShape.prev_tokens, column prev_tokens)."""
  buckets = ENGINE.buckets()

  def cost(shape):
    prev = next((b for b in buckets if b >= shape.prev_tokens), buckets[-1]) if shape.prev_tokens else 0
    T = next(b for b in buckets if b >= shape.num_tokens)
    return true_cost(shape) + (2e-5 * prev if prev > T else 0.0)

  rng = np.random.default_rng(0)
  shapes = [dataclasses.replace(s, prev_tokens=int(rng.integers(0, 257)) if i % 2 else 0)
            for i, s in enumerate(random_shapes(rng, 160))]
  write_profile(tmp_path, shapes, [cost(s) * (1 + 0.01 * rng.standard_normal()) for s in shapes])
  fitted = estimator.fit(estimator.load_profile(str(tmp_path)))
  # Following the smallest bucket is never larger; the others cost what they should, to within the noise.
  assert fitted.after_s[0] == 0 and fitted.after_s[1:] == pytest.approx([2e-5 * b for b in buckets[1:]], rel=0.15)
  decode = StepShape((1, 1), (40, 300))
  assert fitted.step_time_s(dataclasses.replace(decode, prev_tokens=16)) == fitted.step_time_s(decode)
  after_full = fitted.step_time_s(dataclasses.replace(decode, prev_tokens=256)) - fitted.step_time_s(decode)
  assert after_full == pytest.approx(2e-5 * 256, rel=0.15)
  assert 'after a larger step (32:' in fitted.describe()
  chunk = StepShape((100,), (100,))  # bucket 128: only a step of 256 before it costs more
  assert fitted.step_time_s(dataclasses.replace(chunk, prev_tokens=128)) == fitted.step_time_s(chunk)
  assert fitted.step_time_s(dataclasses.replace(chunk, prev_tokens=200)) > fitted.step_time_s(chunk)


def test_cv_error_reports_a_cost_the_features_cannot_express(tmp_path):
  rng = np.random.default_rng(0)
  shapes = random_shapes(rng, 60)
  # Cost that jumps up and down with the parity of the token count: no monotone model fits it.
  write_profile(tmp_path, shapes, [true_cost(s) * (1.5 if s.num_tokens % 2 else 0.7) for s in shapes])
  assert estimator.fit(estimator.load_profile(str(tmp_path))).cv_error['median'] > 0.1


def test_shipped_profile_loads_fits_and_is_monotone():
  profile = estimator.load_profile(SHIPPED)
  assert profile.engine == EngineConfig()  # what `stoker serve` runs with no gin file
  # The tiny preset (fields added to ModelConfig since the profile was taken read as their defaults).
  assert model_checkpoint.model_config({'train': {'model': profile.meta['model']}}) == presets.preset('tiny')
  assert profile.meta['backend'] == 'cpu' and 'loadavg_before' in profile.meta
  assert {'decode', 'prefill', 'mixed'} <= set(profile.kinds) and len(profile.kinds) <= 300
  fitted = estimator.fit(profile)
  assert 0 <= fitted.cv_error['median'] <= fitted.cv_error['p90']
  # Coefficients are non-negative, so more work is never predicted faster.
  assert min(fitted.coef) >= 0
  decodes = [fitted.step_time_s(StepShape((1,) * b, (512,) * b)) for b in (1, 4, 16)]
  chunks = [fitted.step_time_s(StepShape((q,), (q,))) for q in (1, 16, 17, 64, 256)]
  assert decodes == sorted(decodes) and chunks == sorted(chunks)
  # In sample, the fit is at least as close as cross-validation says it is out of sample.
  rel = [abs(fitted.step_time_s(s) / y - 1) for s, y in zip(profile.shapes, profile.wall_s)]
  assert np.median(rel) <= fitted.cv_error['p90']


def test_missing_or_broken_profile(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'no engine profile at .*nowhere.*stoker profile --out'):
    estimator.load_profile(str(tmp_path / 'nowhere'))
  broken = tmp_path / 'broken'
  shutil.copytree(SHIPPED, broken)
  os.remove(broken / 'meta.json')
  with pytest.raises(FileNotFoundError, match=r'meta.json is missing.*stoker profile --out'):
    estimator.load_profile(str(broken))
  write_profile(broken, random_shapes(np.random.default_rng(0), 2), [1e-3, 2e-3])
  with pytest.raises(ValueError, match=r'steps.csv has 2 rows.*stoker profile --out'):
    estimator.load_profile(str(broken))
  (broken / 'steps.csv').write_text('kind,q_lens,kv_lens,wall_s,device_s\n' + 'decode,1,x,1,1\n' * 3)
  with pytest.raises(ValueError, match='steps.csv does not parse'):
    estimator.load_profile(str(broken))


def test_step_shape_names_what_is_wrong():
  with pytest.raises(ValueError, match='2 q_lens but 1 kv_lens'):
    StepShape((1, 1), (4,))
  with pytest.raises(ValueError, match='1 <= q_len <= kv_len'):
    StepShape((5,), (4,))
  with pytest.raises(ValueError, match='prev_tokens -1 < 0'):
    StepShape((1,), (4,), -1)
