"""`stoker profile --out` and `stoker plan --profile/--out` with gs:// and s3:// paths, against the real servers
(conftest.py): a profile written to a bucket is read back by the plan command, and the plan's objects equal the
files of the same plan run locally; an unusable bucket stops each command before its work, exit code 2, naming
the fix. Objects are read with the servers' own clients (servers.py), not through storage/."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os

import pytest

import cli
from serve.sim import estimator, profile
from tests.serve.sim.test_profile import ENGINE_PARAMS
from tests.storage import servers
from tests.storage.conftest import MISSING_BUCKET_FIXES, new_bucket, use_server

SHIPPED = os.path.join(os.path.dirname(estimator.__file__), 'profiles', 'tiny_cpu')
PROFILE_FILES = ('steps.csv', 'host.csv', 'wake.csv', 'meta.json')
PLAN_FILES = ('pareto.png', 'plan.json', 'plan.md')
PLAN = ['plan', '--model', 'tiny', '--devices', 'none', '--profile-price', '0.5', '--slo', 'ttft_p90<30s',
        '--workload', 'requests=12,prompt=uniform:16:64,output=uniform:2:8', '--target-qps', '0.1',
        '--max-seqs', '4']


def stoker(*argv: str) -> str:
  """cli.main(argv), which must succeed; what it printed."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main(list(argv)) == 0
  return printed.getvalue()


def without_wall_times(value):
  """`value` without plan_s and wall_s (the search's and its simulations' own wall-clock times)."""
  if isinstance(value, dict):
    return {k: without_wall_times(v) for k, v in value.items() if k not in ('plan_s', 'wall_s')}
  return [without_wall_times(v) for v in value] if isinstance(value, list) else value


def plan_files(read) -> dict:
  """The plan's files by name, plan.json parsed and without its wall-clock times."""
  files = {name: read(name) for name in PLAN_FILES}
  files['plan.json'] = without_wall_times(json.loads(files['plan.json']))
  return files


@pytest.fixture(scope='module')
def local_plan(tmp_path_factory):
  out = tmp_path_factory.mktemp('plan') / 'plan'
  stoker(*PLAN, '--profile', SHIPPED, '--out', str(out))
  return plan_files(lambda name: (out / name).read_bytes())


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_a_bucket_profile_plans_as_the_local_one(scheme, endpoints, monkeypatch, tmp_path, local_plan):
  use_server(monkeypatch, scheme, endpoints[scheme])
  monkeypatch.chdir(tmp_path)
  bucket = new_bucket(scheme, endpoints[scheme])
  name = bucket.split('://')[1]

  def obj(key):
    return servers.get_object(scheme, endpoints[scheme], name, key)

  with open(os.path.join(SHIPPED, 'steps.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  with open(os.path.join(SHIPPED, 'host.csv'), newline='') as f:
    host = list(csv.DictReader(f))
  with open(os.path.join(SHIPPED, 'wake.csv'), newline='') as f:
    woken = list(csv.DictReader(f))
  with open(os.path.join(SHIPPED, 'meta.json')) as f:
    meta = json.load(f)
  profile.write(f'{bucket}/profiles/tiny_cpu', rows, host, meta, woken)  # what `stoker profile --out` writes with
  for file in PROFILE_FILES:
    with open(os.path.join(SHIPPED, file), 'rb') as f:
      assert obj(f'profiles/tiny_cpu/{file}') == f.read(), file

  printed = stoker(*PLAN, '--profile', f'{bucket}/profiles/tiny_cpu', '--out', f'{bucket}/plan')
  assert f'wrote {bucket}/plan/plan.json, {bucket}/plan/plan.md, {bucket}/plan/pareto.png' in printed
  assert plan_files(lambda file: obj(f'plan/{file}')) == local_plan
  assert sorted(servers.list_objects(scheme, endpoints[scheme], name)) == sorted(
      [f'plan/{f}' for f in PLAN_FILES] + [f'profiles/tiny_cpu/{f}' for f in PROFILE_FILES])
  with pytest.raises(FileNotFoundError, match=f'no engine profile at {bucket}/nothing .*stoker profile --out'):
    estimator.load_profile(f'{bucket}/nothing')  # the bucket is there, the profile is not
  assert not os.path.exists(tmp_path / f'{scheme}:')


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_stoker_profile_writes_a_bucket(scheme, endpoints, monkeypatch, tmp_path):
  """The real command (--quick, the small engine of tests/serve/sim/test_profile.py): the estimator it fits
  is read back from the bucket, and the objects hold the rows it measured."""
  use_server(monkeypatch, scheme, endpoints[scheme])
  monkeypatch.chdir(tmp_path)
  bucket = new_bucket(scheme, endpoints[scheme])
  name = bucket.split('://')[1]
  argv = ['profile', '--out', f'{bucket}/prof', '--quick', '--gin_param', 'model.num_layers=2']
  printed = stoker(*argv, *(a for p in ENGINE_PARAMS for a in ('--gin_param', p)))
  assert f'Wrote {bucket}/prof/steps.csv, host.csv, wake.csv, meta.json.' in printed and 'Fitted: ' in printed
  assert sorted(servers.list_objects(scheme, endpoints[scheme], name)) == [f'prof/{f}' for f in sorted(PROFILE_FILES)]
  steps = list(csv.DictReader(io.StringIO(servers.get_object(scheme, endpoints[scheme], name,
                                                             'prof/steps.csv').decode())))
  meta = json.loads(servers.get_object(scheme, endpoints[scheme], name, 'prof/meta.json'))
  read = estimator.load_profile(f'{bucket}/prof')
  assert meta['steps_rows'] == len(steps) == len(read.shapes) > 0 and read.meta == meta
  assert list(read.wall_s) == [float(r['wall_s']) for r in steps]
  assert len(read.wake) == meta['wake_rows'] > 0  # wake.csv, read back from the bucket
  assert not os.path.exists(tmp_path / f'{scheme}:')


@pytest.mark.parametrize('scheme,fix', MISSING_BUCKET_FIXES)
def test_a_missing_bucket_stops_profile_and_plan_first(scheme, fix, endpoints, monkeypatch, tmp_path, capsys):
  use_server(monkeypatch, scheme, endpoints[scheme])
  monkeypatch.chdir(tmp_path)
  missing = f'{scheme}://stoker-missing'
  for argv in (['profile', '--out', f'{missing}/prof', '--quick'],  # before any measuring
               [*PLAN, '--profile', SHIPPED, '--out', f'{missing}/plan'],  # before the search
               [*PLAN, '--profile', f'{missing}/prof', '--out', 'plan']):  # the profile read
    capsys.readouterr()
    assert cli.main(argv) == 2, argv
    printed = capsys.readouterr()
    assert fix in printed.err and f'{missing}/' in printed.err and 'Traceback' not in printed.err, printed.err
    assert 'Profiled' not in printed.out and 'simulations in' not in printed.out
  assert os.listdir(tmp_path) == []  # no plan/, no gs:/ or s3:/
  assert cli.main(['plan', '--model', 'tiny', '--slo', 'ttft_p90<1s', '--out', f'gcs://{scheme}/plan']) == 2
  assert 'unsupported storage URL' in capsys.readouterr().err
