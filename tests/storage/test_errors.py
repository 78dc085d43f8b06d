"""Bad storage input gives exit code 2, a message naming the path and the fix, no traceback and no output
(nothing in the bucket, no local gs:/s3: directory): an unreachable endpoint, a missing bucket, missing
credentials, and a permission error (a proxy in front of the real server answers 403). The `stoker` command
runs in this process (cli.main) where the environment can be set per test, and in a subprocess, as a user runs
it, for missing credentials (the clients cache credentials per process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cli
from tests.storage import servers
from tests.storage.conftest import MISSING_BUCKET_FIXES, env_for, new_bucket

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREPARE = ['prepare', '--source', os.path.join(os.path.dirname(os.__file__), 'json', '*.py'), '--format', 'text',
           '--train-tokenizer', '--vocab-size', '300']


def stoker(args, env, cwd):
  return subprocess.run([sys.executable, os.path.join(REPO, 'cli.py'), '--host_devices', '1', *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def in_process(args, env, cwd, monkeypatch, capsys):
  """cli.main(args) with os.environ = `env` and the working directory `cwd`; a CompletedProcess-like result."""
  for key in list(os.environ):
    monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.chdir(cwd)
  capsys.readouterr()
  code = cli.main(['--host_devices', '1', *args])
  captured = capsys.readouterr()
  return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _assert_refused(result, cwd, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  for needle in needles:
    assert needle in result.stderr, (needle, result.stderr[-3000:])
  for _, dirs, _ in os.walk(cwd):
    assert 'gs:' not in dirs and 's3:' not in dirs


@pytest.mark.parametrize('scheme,variable', [('gs', 'STORAGE_EMULATOR_HOST'), ('s3', 'AWS_ENDPOINT_URL')])
def test_unreachable_endpoint(scheme, variable, tmp_path, monkeypatch, capsys):
  env = env_for(scheme, f'http://127.0.0.1:{servers.free_port()}', str(tmp_path))
  out = f'{scheme}://stoker-data/out'
  result = in_process([*PREPARE, '--out', out], env, tmp_path, monkeypatch, capsys)
  _assert_refused(result, tmp_path, out, 'cannot reach the storage endpoint', variable)


@pytest.mark.parametrize('scheme,fix', MISSING_BUCKET_FIXES)
def test_missing_bucket(scheme, fix, endpoints, tmp_path, monkeypatch, capsys):
  env = env_for(scheme, endpoints[scheme], str(tmp_path))
  out = f'{scheme}://stoker-missing/data'
  result = in_process([*PREPARE, '--out', out], env, tmp_path, monkeypatch, capsys)
  _assert_refused(result, tmp_path, out, 'does not exist', fix)


def test_missing_bucket_for_a_training_workdir(endpoints, tmp_path, monkeypatch, capsys):
  env = env_for('gs', endpoints['gs'], str(tmp_path))
  run = 'gs://stoker-missing/run'
  result = in_process(['train', '--gin_param', "data.source='synthetic'", '--gin_param', 'data.eval_every=0',
                       '--workdir', run], env, tmp_path, monkeypatch, capsys)
  _assert_refused(result, tmp_path, run, 'does not exist')


def test_missing_credentials(endpoints, tmp_path):
  bucket = new_bucket('s3', endpoints['s3'])
  env = env_for('s3', endpoints['s3'], str(tmp_path))
  for key in servers.S3_CREDENTIALS:
    env.pop(key)
  env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / 'none'), AWS_CONFIG_FILE=str(tmp_path / 'none'))
  result = stoker([*PREPARE, '--out', f'{bucket}/data'], env, tmp_path)
  _assert_refused(result, tmp_path, f'{bucket}/data', 'no credentials', 'AWS_ACCESS_KEY_ID')
  assert servers.list_objects('s3', endpoints['s3'], bucket.split('://')[1]) == {}


def test_missing_google_credentials(tmp_path):
  env = env_for('gs', '', str(tmp_path))
  del env['STORAGE_EMULATOR_HOST']  # real GCS: Google's default credentials, none here
  env.pop('GOOGLE_APPLICATION_CREDENTIALS', None)
  env.update(GCE_METADATA_HOST='127.0.0.1:1', GCE_METADATA_IP='127.0.0.1:1', NO_GCE_CHECK='true')
  result = stoker([*PREPARE, '--out', 'gs://stoker-data/out'], env, tmp_path)
  _assert_refused(result, tmp_path, 'gs://stoker-data/out', 'no credentials',
                  'gcloud auth application-default login')


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_permission_denied(scheme, endpoints, tmp_path, monkeypatch, capsys):
  bucket = new_bucket(scheme, endpoints[scheme])
  with servers.Proxy(endpoints[scheme]) as proxy:
    proxy.deny = True
    env = env_for(scheme, proxy.url, str(tmp_path))
    result = in_process([*PREPARE, '--out', f'{bucket}/data'], env, tmp_path, monkeypatch, capsys)
  _assert_refused(result, tmp_path, f'{bucket}/data', 'permission denied', bucket)
  assert servers.list_objects(scheme, endpoints[scheme], bucket.split('://')[1]) == {}


def test_an_unknown_scheme_is_refused_not_made_a_local_directory(tmp_path, monkeypatch, capsys):
  result = in_process([*PREPARE, '--out', 'gcs://stoker-data/out'], dict(os.environ, HOME=str(tmp_path)), tmp_path,
                      monkeypatch, capsys)
  _assert_refused(result, tmp_path, 'gcs://stoker-data/out', 'gs://BUCKET/PATH')
  assert not (tmp_path / 'gcs:').exists()


def test_convert_into_a_bucket_is_refused_with_the_fix(endpoints, tmp_path, monkeypatch, capsys):
  env = env_for('gs', endpoints['gs'], str(tmp_path))
  out = 'gs://stoker-data/converted'
  result = in_process(['convert', '--from-hf', str(tmp_path / 'hf'), '--out', out], env, tmp_path, monkeypatch,
                      capsys)
  _assert_refused(result, tmp_path, out, 'convert into a local directory, then copy it')
