"""The `stoker` command end to end, in a subprocess as a user runs it."""

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stoker(*args, cwd):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  return subprocess.run([sys.executable, os.path.join(REPO, 'cli.py'), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.xdist_group('cli')
def test_train_30_steps_loss_falls(tmp_path):
  workdir = tmp_path / 'W'
  cache = tmp_path / 'cache'  # the stdlib corpus is prepared here on first use
  result = stoker('train', '--gin_file', 'configs/train/tiny_cpu.gin',
                  '--gin_param', 'train.steps=30', '--gin_param', f"data.cache_dir='{cache}'",
                  '--workdir', str(workdir), cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  records = [r for r in logged if 'loss' in r]
  validation = [r for r in logged if 'val_loss' in r]
  assert [r['step'] for r in records] == [10, 20, 30]
  assert records[-1]['loss'] < records[0]['loss'] - 0.5
  # Validation at step 30 on the prepared stdlib split: better than a uniform guess over V.
  assert [r['step'] for r in validation] == [30]
  assert validation[0]['val_perplexity'] < 4096 / 4 and validation[0]['val_tokens'] > 0
  assert os.path.exists(cache / 'stdlib-v4096' / 'manifest.json')
  for r in records:
    assert {'step', 'loss', 'tokens_per_sec', 'mfu'} <= set(r)
    assert r['tokens_per_sec'] > 0 and 0 < r['mfu'] < 1
  assert glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))
  assert "'data': 8" in result.stderr  # ran on the 8-device CPU mesh


@pytest.mark.parametrize('args,message', [
    (['--gin_param', 'train.stepz=3'], 'stepz'),
    (['--gin_file', 'no/such.gin'], "gin file 'no/such.gin' not found"),
    (['--gin_param', 'mesh.ici=(3, -1, 1)'], 'not a multiple of 3'),
    (['--gin_param', "model.name='llama9'"], "Unknown model preset 'llama9'"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, args, message):
  result = stoker('train', '--workdir', str(tmp_path), *args, cwd=REPO)
  assert result.returncode == 2, result.stderr[-3000:]
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
