"""`stoker bench --out gs://... / s3://...` against the real servers (conftest.py) and the scripted SSE server of
tests/serve/bench/fixtures.py: a prefill profile, a capacity search and the full report go to the bucket, and
every object equals the file the same run's data writes locally; the profile and tokenizer read back from the
bucket; a missing bucket stops the command before the first request. Objects are read with the servers' own
clients (servers.py), not through storage/."""

from __future__ import annotations

import json
import os

import pytest

import cli
import storage
from serve.bench import plots, report, run
from tests.serve.bench.fixtures import KEY, SSEServer, tiny_tokenizer
from tests.storage import servers
from tests.storage.conftest import MISSING_BUCKET_FIXES, new_bucket, use_server

WORKLOAD = 'requests=4,arrival=fixed,prompt=uniform:4:12,output=fixed:3,seed=1'
# Loose deadlines: both probed rates pass on a busy host too, so the probes (and object names) are known.
SEARCH = ['--capacity-search', '--start-rate', '8', '--max-rate', '16', '--max-probes', '2',
          '--decode-deadline', '1', '--ttft-slack', '2']


@pytest.fixture(scope='module')
def server():
  sse = SSEServer()
  url = sse.start()
  yield url
  sse.stop()


def recorded(monkeypatch) -> list:
  """Every report.write_run, report.write_json and plots.plot_capacity call of the run, as (function, path,
  args), each still writing."""
  calls = []
  for module, name in ((report, 'write_run'), (report, 'write_json'), (plots, 'plot_capacity')):
    fn = getattr(module, name)
    first_is_path = name != 'write_json'  # write_json(data, path)

    def spy(*args, fn=fn, first_is_path=first_is_path, **kwargs):
      path, rest = (args[0], args[1:]) if first_is_path else (args[1], args[:1])
      calls.append((fn, path, first_is_path, rest, kwargs))
      return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
  return calls


@pytest.mark.parametrize('scheme,flags', [('gs', []), ('s3', ['--no-plots'])])  # PNGs: ~2 s of matplotlib a run
def test_bench_writes_a_bucket_as_it_writes_locally(scheme, flags, endpoints, server, monkeypatch, tmp_path):
  use_server(monkeypatch, scheme, endpoints[scheme])
  monkeypatch.chdir(tmp_path)
  bucket = new_bucket(scheme, endpoints[scheme])
  name = bucket.split('://')[1]
  tiny_tokenizer().save(str(tmp_path / 'tokenizer.json'))
  storage.put_file(str(tmp_path / 'tokenizer.json'), f'{bucket}/tok/tokenizer.json')
  calls = recorded(monkeypatch)
  out = f'{bucket}/run'
  assert cli.main(['bench', '--url', server, '--api-key', KEY, '--tokenizer', f'{bucket}/tok', '--out', out,
                   '--no-progress', '--workload', WORKLOAD, '--profile-prefill', '4,8', '--profile-repeats', '1',
                   *SEARCH, *flags]) == 0

  local = tmp_path / 'local'
  for fn, path, first_is_path, rest, kwargs in calls:  # the same data, written to a local directory
    mine = str(local / os.path.relpath(path.removeprefix(f'{bucket}/'), 'run'))
    fn(*((mine, *rest) if first_is_path else (*rest, mine)), **kwargs)
  files = {os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs}
  objects = servers.list_objects(scheme, endpoints[scheme], name)
  assert sorted(objects) == sorted(['tok/tokenizer.json'] + [f'run/{f}' for f in files])
  assert {'prefill_profile.json', 'capacity.json', 'requests.csv', 'summary.json', 'capacity/rate_8/summary.json',
          'capacity/rate_16/requests.csv'} | ({'capacity.png', 'cdfs.png'} if not flags else set()) <= files
  for f in files:
    assert servers.get_object(scheme, endpoints[scheme], name, f'run/{f}') == (local / f).read_bytes(), f

  profile = json.loads(servers.get_object(scheme, endpoints[scheme], name, 'run/prefill_profile.json'))
  assert run.load_profile(f'{out}/prefill_profile.json') == tuple(profile['coefficients'])
  assert not os.path.exists(tmp_path / f'{scheme}:')


@pytest.mark.parametrize('scheme,fix', MISSING_BUCKET_FIXES)
def test_a_missing_bucket_stops_bench_first(scheme, fix, endpoints, monkeypatch, tmp_path, capsys):
  """Checked before the server is: the endpoint here would be refused (port 9) with another message."""
  use_server(monkeypatch, scheme, endpoints[scheme])
  monkeypatch.chdir(tmp_path)
  tiny_tokenizer().save(str(tmp_path / 'tokenizer.json'))
  out = f'{scheme}://stoker-missing/run'
  assert cli.main(['bench', '--url', 'http://127.0.0.1:9', '--tokenizer', str(tmp_path), '--out', out]) == 2
  err = capsys.readouterr().err
  assert fix in err and out in err and 'Traceback' not in err, err
  assert os.listdir(tmp_path) == ['tokenizer.json']
