"""Session fixtures: a GCS emulator and an S3 server on 127.0.0.1 (tests/storage/servers.py), and `env`, the
environment that points Stoker at one of them through the standard variables."""

from __future__ import annotations

import itertools
import os

import pytest

from tests.storage import servers

_buckets = itertools.count()


@pytest.fixture(scope='session')
def endpoints(tmp_path_factory):
  """{'gs': URL, 's3': URL} of the two servers, started once per session."""
  logs = tmp_path_factory.mktemp('storage-servers')
  started = {scheme: servers.start(kind, str(logs / f'{kind}.log')) for scheme, kind in (('gs', 'gcs'), ('s3', 's3'))}
  yield {scheme: url for scheme, (_, url) in started.items()}
  for process, _ in started.values():
    process.kill()
    process.wait()


def env_for(scheme: str, endpoint: str, home: str) -> dict:
  """os.environ with Stoker pointed at `endpoint` for `scheme`, and a clean HOME (no real credentials)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_PLATFORMS', 'STORAGE_EMULATOR_HOST', 'AWS_ENDPOINT_URL')
         and not k.startswith('AWS_')}
  env.update(HOME=home, STOKER_CACHE=os.path.join(home, 'bucket-cache'), AWS_EC2_METADATA_DISABLED='true')
  if scheme == 'gs':
    env['STORAGE_EMULATOR_HOST'] = endpoint
  else:
    env.update(AWS_ENDPOINT_URL=endpoint, **servers.S3_CREDENTIALS)
  return env


# A bucket no emulator holds, and the fix each scheme's error must name.
MISSING_BUCKET_FIXES = [('gs', 'gcloud storage buckets create gs://stoker-missing'),
                        ('s3', 'aws s3 mb s3://stoker-missing')]


def new_bucket(scheme: str, endpoint: str) -> str:
  name = f'stoker-{scheme}-{os.getpid()}-{next(_buckets)}'
  servers.make_bucket(scheme, endpoint, name)
  return f'{scheme}://{name}'


def use_server(monkeypatch, scheme: str, endpoint: str) -> None:
  """Points Stoker in this process at `endpoint` for `scheme` (for this test only)."""
  if scheme == 'gs':
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', endpoint)
  else:
    monkeypatch.setenv('AWS_ENDPOINT_URL', endpoint)
    for key, value in servers.S3_CREDENTIALS.items():
      monkeypatch.setenv(key, value)
