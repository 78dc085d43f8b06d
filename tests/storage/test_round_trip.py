"""The real commands against real storage servers (tests/storage/servers.py), as a user runs them, for gs://
and s3://: `stoker prepare --out BUCKET/data`, `stoker train --workdir BUCKET/run` on that data with a
just-in-time failure, the resume from the bucket, `stoker serve --checkpoint BUCKET/run` answering a request.
The objects are checked over each server's own HTTP API, not through Stoker."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx2 as httpx
import pytest

from tests.storage import servers
from tests.storage.conftest import env_for, new_bucket
from train import faults

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(os.path.dirname(os.__file__), 'json', '*.py')
TRAIN = ['--gin_file', 'configs/train/tiny_cpu.gin', '--gin_param', 'train.steps=6', '--gin_param',
         'train.log_every=2', '--gin_param', 'checkpoint.every_steps=2', '--gin_param', 'data.eval_every=0',
         '--gin_param', 'train.seq_len=32', '--gin_param', 'train.batch_size=8', '--gin_param',
         'model.d_model=64', '--gin_param', 'model.num_layers=1', '--gin_param', 'model.mlp_dim=128',
         '--gin_param', 'model.vocab_size=320']
ENGINE = ['engine.num_pages=64', 'engine.page_size=8', 'engine.max_seqs=4', 'engine.max_pages_per_seq=16',
          'engine.token_budget=32', 'engine.min_bucket=32']


def stoker(*args, env, cwd, host_devices=1):
  return subprocess.run([sys.executable, os.path.join(REPO, 'cli.py'), '--host_devices', str(host_devices),
                         *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _no_local_scheme_dirs(*roots) -> None:
  for root in roots:
    for directory, dirs, _ in os.walk(root):
      assert not [d for d in dirs if d in ('gs:', 's3:')], f'a local {dirs} directory in {directory}'


# gs: an exception in step 3 saves the state before it just in time; s3: SIGKILL in the middle of writing the
# checkpoint of step 4 leaves it without Orbax's commit marker, so the resume starts from step 2.
@pytest.mark.parametrize('scheme,fault,exit_code,resumed', [
    ('gs', ['fault.kind="exception"', 'fault.step=3'], faults.EXIT_STEP_FAILED, 3),
    ('s3', ['fault.kind="kill_in_save"', 'fault.step=4'], -signal.SIGKILL, 2)])
def test_prepare_train_fail_resume_serve_in_a_bucket(scheme, fault, exit_code, resumed, endpoints, tmp_path):
  endpoint = endpoints[scheme]
  env = env_for(scheme, endpoint, str(tmp_path / 'home'))
  bucket = new_bucket(scheme, endpoint)
  name = bucket.split('://')[1]
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  data, run = f'{bucket}/data', f'{bucket}/run'

  r = stoker('prepare', '--source', CORPUS, '--format', 'text', '--train-tokenizer', '--vocab-size', '300',
             '--validation-fraction', '0.2', '--out', data, env=env, cwd=cwd)
  assert r.returncode == 0, r.stderr[-3000:]
  objects = servers.list_objects(scheme, endpoint, name)
  manifest = json.loads(servers.get_object(scheme, endpoint, name, 'data/manifest.json'))
  shards = [s for split in manifest['splits'].values() for s in split['shards']]
  assert shards and {'data/manifest.json', 'data/tokenizer.json'} <= set(objects)
  for shard in shards:  # each shard whole, as the manifest records it
    body = servers.get_object(scheme, endpoint, name, f'data/{shard["path"]}')
    assert hashlib.sha256(body).hexdigest() == shard['sha256']

  fail = [a for g in fault for a in ('--gin_param', g)]
  source = ['--gin_param', f"data.source='{data}'"]
  r = stoker('train', *TRAIN, *source, *fail, '--workdir', run, env=env, cwd=REPO)
  assert r.returncode == exit_code, r.stderr[-3000:]
  objects = servers.list_objects(scheme, endpoint, name)
  assert f'run/checkpoints/{resumed}/commit_success.txt' in objects  # the save to resume from, committed
  assert 'run/checkpoints/4/commit_success.txt' not in objects
  r = stoker('train', *TRAIN, *source, '--workdir', run, env=env, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'Resumed from the checkpoint of step {resumed} in {run}/checkpoints' in r.stderr
  objects = servers.list_objects(scheme, endpoint, name)
  metrics = [json.loads(line) for line in
             servers.get_object(scheme, endpoint, name, 'run/metrics.jsonl').decode().splitlines()]
  # A SIGKILL loses the records not yet uploaded (train/metrics.py uploads every 10 s and at exit).
  assert [m['step'] for m in metrics] in ([[2, 4, 6]] if scheme == 'gs' else [[2, 4, 6], [4, 6]])
  assert {'run/config.json', 'run/checkpoints/6/commit_success.txt'} <= set(objects)
  assert any(k.startswith('run/tensorboard/events.out.tfevents.') for k in objects)

  server = subprocess.Popen([sys.executable, os.path.join(REPO, 'cli.py'), '--host_devices', '1', 'serve',
                             '--checkpoint', run, '--port', '0', *[a for g in ENGINE for a in ('--gin_param', g)]],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = server.stdout.readline()
    assert line.startswith('Listening on http://127.0.0.1:'), (line, server.stderr.read()[-3000:])
    url = line.split()[2]
    deadline = time.time() + 300
    while time.time() < deadline and server.poll() is None and httpx.get(url + '/health').status_code != 200:
      time.sleep(0.2)
    reply = httpx.post(url + '/v1/completions', json={'model': 'run', 'prompt': 'import json', 'max_tokens': 4},
                       timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()['usage']['completion_tokens'] == 4
  finally:
    server.kill()
    server.wait()
  _no_local_scheme_dirs(cwd, REPO, tmp_path)
