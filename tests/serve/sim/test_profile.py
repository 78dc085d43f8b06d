"""`stoker profile --quick` drives the real engine and writes a profile the estimator fits."""

import contextlib
import csv
import io
import json

import pytest

import cli
from serve.engine import EngineConfig
from serve.sim import estimator, probe, profile, wake
from serve.sim.shape import StepShape

# A small engine (buckets 16 and 32) and a 2-layer tiny model keep the compile to seconds.
ENGINE_PARAMS = ['engine.num_pages=64', 'engine.page_size=8', 'engine.max_seqs=4',
                 'engine.max_pages_per_seq=16', 'engine.token_budget=32', 'engine.min_bucket=16']
pytestmark = pytest.mark.xdist_group('sim_profile')  # one quick profile, shared by the module
ENGINE = EngineConfig(num_pages=64, page_size=8, max_seqs=4, max_pages_per_seq=16, token_budget=32,
                      min_bucket=16)


@pytest.fixture(scope='module')
def quick_profile(tmp_path_factory):
  out = tmp_path_factory.mktemp('profile') / 'tiny'
  argv = ['profile', '--out', str(out), '--quick', '--gin_param', 'model.num_layers=2']
  for p in ENGINE_PARAMS:
    argv += ['--gin_param', p]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main(argv) == 0
  return out, printed.getvalue()


def test_quick_profile_writes_the_grid(quick_profile):
  quick_profile, printed = quick_profile
  with open(quick_profile / 'steps.csv') as f:
    rows = list(csv.DictReader(f))
  grid = profile.grid_for(ENGINE, quick=True)
  assert [r['kind'] for r in rows].count('decode') == len(grid.decode_batches)
  assert [r['kind'] for r in rows].count('prefill') == len(grid.prefill_chunks) * len(grid.prefill_cached)
  assert [r['kind'] for r in rows].count('mixed') == 1
  assert [r['kind'] for r in rows].count('after') == len(grid.after_decodes) * len(grid.after_buckets) == 1
  for r in rows:
    q = [int(x) for x in r['q_lens'].split(';')]
    kv = [int(x) for x in r['kv_lens'].split(';')]
    assert sum(q) == int(r['tokens']) <= int(r['bucket']) <= ENGINE.token_budget
    assert len(q) == int(r['num_seqs']) <= ENGINE.max_seqs and max(kv) <= 16 * 8
    assert (int(r['prev_tokens']) > 0) == (r['kind'] == 'after')
    assert float(r['wall_s']) >= float(r['wall_min_s']) > 0 and float(r['device_s']) > 0
    assert int(r['repeats']) == grid.repeats
    if r['kind'] == 'decode':
      assert set(q) == {1} and len(q) in grid.decode_batches
    elif r['kind'] == 'prefill':
      assert len(q) == 1 and q[0] in grid.prefill_chunks and kv[0] - q[0] in grid.prefill_cached
    elif r['kind'] == 'after':  # one decode, right after a step of the largest bucket
      assert q == [1] and int(r['prev_tokens']) == ENGINE.token_budget
    else:
      assert q == [1, ENGINE.min_bucket]  # one decode and a new prompt's chunk, in one step
  with open(quick_profile / 'host.csv') as f:
    host = list(csv.DictReader(f))
  assert [int(h['num_seqs']) for h in host] == list(grid.decode_batches)
  assert all(float(h[k]) > 0 for h in host for k in probe.HOST_FIELDS[1:])
  meta = json.loads((quick_profile / 'meta.json').read_text())
  with open(quick_profile / 'wake.csv') as f:
    woken = list(csv.DictReader(f))
  assert list(woken[0]) == list(wake.FIELDS)
  steps = len({r['index'] for r in woken})  # step() calls of a two-chunk prompt and its decodes
  assert len(woken) == len(grid.wake_gaps) * grid.wake_repeats * steps and steps >= 2 + wake.DECODES
  assert all(float(r['wall_s']) > 0 and float(r['busy_s']) > 0 for r in woken)
  assert meta['wake_rows'] == len(woken) and 'wake.csv' in printed
  assert meta['backend'] == 'cpu' and meta['device_kind'] and meta['jax_version']
  assert meta['model']['num_layers'] == 2 and meta['model']['d_model'] == 256  # tiny, overridden
  assert EngineConfig(**meta['engine']) == ENGINE
  assert meta['quick'] and meta['grid']['repeats'] == grid.repeats and len(meta['loadavg_before']) == 3
  assert 'Profiled 3,671,296 parameters on cpu' in printed  # tiny with 2 layers
  assert 'CV relative error median' in printed


def test_quick_profile_fits(quick_profile):
  fitted = estimator.fit(estimator.load_profile(str(quick_profile[0])))
  assert fitted.engine == ENGINE and fitted.cv_error['rows'] == 8
  # Real timings, on a host that CI shares with another worker: a 16- and a 32-token step of this 2-layer model
  # can measure alike (CI, 2026-12-07: both 3.3 ms, CV p90 217%), so only what the fit guarantees is asserted
  # here, a positive and monotone cost; test_estimator.py checks that it recovers known costs exactly.
  assert 0 < fitted.step_time_s(StepShape((1,), (20,))) <= fitted.step_time_s(StepShape((1, 16), (20, 16)))


def test_profile_cli_errors(tmp_path, capsys):
  assert cli.main(['profile', '--out', str(tmp_path), '--model', 'nope']) == 2
  assert "Unknown model preset 'nope'" in capsys.readouterr().err
  assert cli.main(['profile', '--out', str(tmp_path), '--tensor_parallel', '99']) == 2
  assert '--tensor_parallel 99' in capsys.readouterr().err
