"""Multi-process training on this machine (`stoker launch`, gloo collectives between processes).

Four short runs of one config on a prepared corpus: 1 process x 8 devices (the reference), 2
processes x 4 devices that fail in step 3 (an injected exception: both processes save the state
before it, together), that checkpoint resumed by 1 process, and the reference's step-3 checkpoint
resumed by 2 processes. Every logged loss must match the reference's within float32 tolerance:
the same global batches reach the same model, however the processes split them.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.xdist_group('multiprocess')]


def stoker(*args, timeout=480):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  return subprocess.run([sys.executable, os.path.join(REPO, 'cli.py'), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  words = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu'.split()
  for i in range(120):
    (root / f'd{i}.txt').write_text(' '.join(rng.choice(words, rng.integers(20, 200))))
  out = root / 'prep'
  result = stoker('prepare', '--source', str(root / '*.txt'), '--out', str(out),
                  '--train-tokenizer', '--vocab-size', '320')
  assert result.returncode == 0, result.stderr[-2000:]
  return out


def train_args(workdir, data, *extra):
  params = ['model.num_layers=2', 'model.d_model=64', 'model.num_heads=4', 'model.num_kv_heads=2',
            'model.head_dim=16', 'model.mlp_dim=128', 'model.vocab_size=320', f"data.source='{data}'",
            'data.eval_every=0', 'train.steps=6', 'train.batch_size=8', 'train.seq_len=32',
            'train.log_every=1', 'checkpoint.every_steps=3', *extra]
  args = ['train', '--gin_file', 'train/tiny_cpu.gin', '--workdir', str(workdir)]
  for p in params:
    args += ['--gin_param', p]
  return args


def losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(str(workdir)) if 'loss' in r}


def test_two_processes_match_one_and_checkpoints_cross_process_counts(prepared, tmp_path):
  one = tmp_path / 'one'
  result = stoker(*train_args(one, prepared))
  assert result.returncode == 0, result.stderr[-3000:]
  reference = losses(one)
  assert sorted(reference) == [1, 2, 3, 4, 5, 6]

  two = tmp_path / 'two'
  failed = stoker('launch', '--local-processes', '2', '--devices-per-process', '4', '--',
                  *train_args(two, prepared, "fault.kind='exception'", 'fault.step=3'))
  assert failed.returncode == 81, failed.stderr[-3000:]  # a step failed; its state was saved
  assert "Joined a 2-process job as process 1" in failed.stderr
  resumed = stoker(*train_args(two, prepared))  # 2 processes' checkpoint, 1 process
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from the checkpoint of step 3 ' in resumed.stderr

  other = tmp_path / 'other'
  shutil.copytree(one / 'checkpoints' / '3', other / 'checkpoints' / '3')
  result = stoker('launch', '--local-processes', '2', '--devices-per-process', '4', '--',
                  *train_args(other, prepared))  # 1 process's checkpoint, 2 processes
  assert result.returncode == 0, result.stderr[-3000:]

  for workdir, steps in ((two, range(1, 7)), (other, range(4, 7))):
    got = losses(workdir)
    assert sorted(got) == list(steps)
    np.testing.assert_allclose([got[s] for s in steps], [reference[s] for s in steps],
                               rtol=1e-5, atol=1e-5)
