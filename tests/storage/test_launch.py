"""A 2-process `stoker launch` job with a gs:// workdir: one metrics.jsonl in the bucket, a just-in-time
failure, and the resume of both processes from the bucket (minutes on 2 CPU cores: marked slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.storage import servers
from tests.storage.conftest import env_for, new_bucket
from tests.storage.test_round_trip import CORPUS, REPO, TRAIN

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_two_processes_share_one_bucket_workdir(endpoints, tmp_path):
  endpoint = endpoints['gs']
  env = env_for('gs', endpoint, str(tmp_path / 'home'))
  bucket = new_bucket('gs', endpoint)
  name = bucket.split('://')[1]
  cli = [sys.executable, os.path.join(REPO, 'cli.py')]
  r = subprocess.run([*cli, 'prepare', '--source', CORPUS, '--format', 'text', '--train-tokenizer',
                      '--vocab-size', '300', '--out', f'{bucket}/data'], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  launch = [*cli, 'launch', '--local-processes', '2', '--devices-per-process', '1', '--', 'train', *TRAIN,
            '--gin_param', f"data.source='{bucket}/data'", '--workdir', f'{bucket}/run']
  fail = ['--gin_param', "fault.kind='exception'", '--gin_param', 'fault.step=3']
  r = subprocess.run([*launch, *fail], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode != 0 and 'saved the state before it' in r.stderr, r.stderr[-3000:]
  r = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr.count(f'Resumed from the checkpoint of step 3 in {bucket}/run/checkpoints') == 2
  objects = servers.list_objects('gs', endpoint, name)
  assert [k for k in objects if 'metrics' in k] == ['run/metrics.jsonl']
  metrics = [json.loads(line) for line in servers.get_object('gs', endpoint, name, 'run/metrics.jsonl').splitlines()]
  assert [m['step'] for m in metrics] == [2, 4, 6]
  assert {'run/checkpoints/6/data/process-0-of-2.json', 'run/checkpoints/6/data/process-1-of-2.json',
          'run/checkpoints/6/commit_success.txt'} <= set(objects)
  for _, dirs, _ in os.walk(tmp_path):
    assert 'gs:' not in dirs
