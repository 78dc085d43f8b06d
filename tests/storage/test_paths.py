"""storage/paths.py against the real servers (tests/storage/servers.py) and the local filesystem: what it
writes is what each server's own API lists, writes are whole or absent, Parquet row groups are read by ranges
(a counting proxy sees a fraction of the shard), transient errors are retried and user errors are not."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage
from data import source
from tests.storage import servers
from tests.storage.conftest import new_bucket, use_server


@pytest.fixture(params=['gs', 's3'])
def bucket(request, endpoints, monkeypatch):
  """(a new bucket URL, its scheme, the endpoint), with Stoker pointed at the endpoint."""
  scheme = request.param
  use_server(monkeypatch, scheme, endpoints[scheme])
  return new_bucket(scheme, endpoints[scheme]), scheme, endpoints[scheme]


def test_files_round_trip_as_the_server_lists_them(bucket):
  url, scheme, endpoint = bucket
  name = url.split('://')[1]
  storage.write_text(storage.join(url, 'run', 'config.json'), '{"a": 1}')
  storage.write_bytes(storage.join(url, 'run', 'checkpoints', '3', 'x.bin'), b'\0\1\2')
  assert servers.list_objects(scheme, endpoint, name) == {'run/config.json': 8, 'run/checkpoints/3/x.bin': 3}
  assert servers.get_object(scheme, endpoint, name, 'run/checkpoints/3/x.bin') == b'\0\1\2'
  assert storage.read_text(f'{url}/run/config.json') == '{"a": 1}'
  assert storage.listdir(f'{url}/run') == ['checkpoints', 'config.json']
  assert storage.glob(f'{url}/run/checkpoints/*/x.bin') == [f'{url}/run/checkpoints/3/x.bin']
  assert storage.isdir(f'{url}/run/checkpoints') and not storage.isfile(f'{url}/run/checkpoints')
  assert storage.isfile(f'{url}/run/config.json') and storage.size(f'{url}/run/config.json') == 8
  assert not storage.exists(f'{url}/run/none')
  storage.rmtree(f'{url}/run/checkpoints')
  assert servers.list_objects(scheme, endpoint, name) == {'run/config.json': 8}


@pytest.mark.parametrize('where', ['bucket', 'local'])
def test_a_write_that_fails_leaves_nothing(where, bucket, tmp_path):
  url, scheme, endpoint = bucket
  path = storage.join(url if where == 'bucket' else str(tmp_path), 'manifest.json')
  storage.write_text(path, 'old')
  with pytest.raises(RuntimeError):
    with storage.open(path, 'w') as f:
      f.write('half of the new')
      raise RuntimeError('killed mid-write')
  assert storage.read_text(path) == 'old'  # the earlier file, whole
  assert storage.listdir(storage.dirname(path)) == ['manifest.json']  # no temporary left behind


def test_parquet_row_groups_are_read_by_ranges(bucket):
  url, scheme, endpoint = bucket
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 1000, 200).astype(np.int32) for _ in range(64)]
  table = pa.table({'tokens': pa.array(docs, pa.list_(pa.int32()))})
  buffer = io.BytesIO()
  pq.write_table(table, buffer, row_group_size=4, compression='none')
  path = f'{url}/shard.parquet'
  storage.write_bytes(path, buffer.getvalue())
  with servers.Proxy(endpoint) as proxy:
    variable = 'STORAGE_EMULATOR_HOST' if scheme == 'gs' else 'AWS_ENDPOINT_URL'
    with pytest.MonkeyPatch.context() as m:
      m.setenv(variable, proxy.url)
      parquet = source._parquet(path)  # pylint: disable=protected-access
      proxy.bytes_out = 0
      group = parquet.read_row_group(5, columns=['tokens']).column('tokens').to_pylist()
  assert group == [d.tolist() for d in docs[20:24]]  # the independent reference: the rows written
  assert 0 < proxy.bytes_out < len(buffer.getvalue()) / 8, (proxy.bytes_out, len(buffer.getvalue()))


def test_transient_errors_are_retried_user_errors_are_not():
  calls = []

  def flaky():
    calls.append(1)
    if len(calls) < 3:
      raise ConnectionResetError('connection reset by peer')
    return 'read'

  assert storage.with_retries(flaky, 'a test read', first_wait_s=0.001) == 'read' and len(calls) == 3

  def missing():
    calls.append(1)
    raise FileNotFoundError('gs://b/none')

  calls.clear()
  with pytest.raises(FileNotFoundError):
    storage.with_retries(missing, 'a test read', first_wait_s=0.001)
  assert len(calls) == 1


def test_local_paths_stay_local_and_bad_urls_are_refused(tmp_path):
  assert storage.absolute('a/b') == str(tmp_path.cwd() / 'a' / 'b')
  assert storage.join('gs://b/run/', 'checkpoints', '3') == 'gs://b/run/checkpoints/3'
  assert storage.absolute('s3://b/run/') == 's3://b/run'
  assert not storage.is_bucket(str(tmp_path)) and storage.is_bucket('gs://b/x')
  for bad in ('gs:/b/run', 'gcs://b/run', 's3a://b/run', 'gs://'):
    with pytest.raises(storage.StorageError, match='unsupported storage URL'):
      storage.is_bucket(bad)


def test_a_local_write_has_the_permissions_open_gives(tmp_path):
  storage.write_text(str(tmp_path / 'a.json'), '{}')
  with open(tmp_path / 'b.json', 'w') as f:  # the reference: the builtin open under the same umask
    f.write('{}')
  assert (tmp_path / 'a.json').stat().st_mode == (tmp_path / 'b.json').stat().st_mode
