"""Multi-process training on this machine (`stoker launch`, gloo collectives between processes).

Short runs of one config on a prepared corpus: 1 process x 8 devices (the reference), 2
processes x 4 devices that fail in step 3 (an injected exception: both processes save the state
before it, together), that checkpoint resumed by 1 process, the reference's step-3 checkpoint
resumed by 2 processes, and a supervised 2-process run whose process 1 is SIGKILLed mid-run (and
the launcher noticing that death while process 0 still runs).
Every logged loss must match the reference's within float32 tolerance: the same global batches
reach the same model, however the processes split them.
"""

import logging
import shutil
import signal
import sys
import time

import jax
import numpy as np
import pytest

from parallelism.launch import run_local
from tests.parallelism.launching import stoker
from train.checkpoint import restore_arrays
from train.metrics import read_metrics

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.xdist_group('multiprocess')]


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


@pytest.fixture(scope='module')
def one(prepared, tmp_path_factory):
  """The reference: 1 process x 8 devices, 6 steps, checkpoints every 3."""
  workdir = tmp_path_factory.mktemp('one')
  result = stoker(*train_args(workdir, prepared))
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(losses(workdir)) == [1, 2, 3, 4, 5, 6]
  return workdir


def test_two_processes_match_one_and_checkpoints_cross_process_counts(prepared, one, tmp_path):
  reference = losses(one)

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


def test_sigkill_of_one_process_resumes_from_the_survivors_save(prepared, tmp_path):
  """Process 1 dies in step 4 (after the periodic checkpoint of step 3). Usually process 0's
  gradient all-reduce stalls; the launcher tells its watchdog at once (the default hang timeout, 600
  s, would outlast the launcher's grace), which saves the pre-step state of step 4 without
  collectives and exits; the supervisor restarts both, which resume at step 4. Sometimes gloo aborts process 0
  at once (an uncaught C++ exception: `terminate called after throwing an instance of
  'gloo::EnforceNotMet'`, SIGABRT), before any Python code can save; the restart then resumes from
  the checkpoint of step 3. Either way the run ends bitwise equal to an uninterrupted 2-process run."""
  uninterrupted = tmp_path / 'uninterrupted'
  result = stoker('launch', '--local-processes', '2', '--devices-per-process', '4', '--',
                  *train_args(uninterrupted, prepared))
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = tmp_path / 'killed'
  # A synchronous periodic save: the checkpoint of step 3 is committed before step 4 starts. An
  # async one may still be in flight when process 1 dies, and is then never committed; after an
  # abort of process 0 the restart would start from scratch and the fault would fire again.
  # So one restart suffices in both outcomes.
  result = stoker('launch', '--local-processes', '2', '--devices-per-process', '4', '--grace_s',
                  '120', '--supervise', '--max_restarts', '1', '--',
                  *train_args(workdir, prepared, "fault.kind='sigkill'", 'fault.process=1',
                              'fault.step=4', 'checkpoint.async_save=False'))
  assert result.returncode == 0, result.stderr[-4000:]
  log = result.stderr
  assert 'injected fault: SIGKILL in step 4' in log, log[-4000:]
  assert 'Process 1 exited with -9' in log, log[-4000:]
  assert 'restart 1 of 1' in log, log[-4000:]
  if 'Emergency checkpoint of step 4: process 0' in log:  # process 0 lived to save
    assert 'Process 1 of this job exited with -9: saving what this process holds now' in log, log[-4000:]
    # Killed in step 4 (0-based), resumed before it: step 4 alone is computed twice.
    assert 'Resumed from the emergency checkpoint of step 4 ' in log, log[-4000:]
  else:  # gloo aborted process 0 before its watchdog could save
    assert 'Process 0 exited with -6' in log, log[-4000:]  # SIGABRT
    assert 'Resumed from the checkpoint of step 3 ' in log, log[-4000:]
    assert 'Resumed from the emergency checkpoint' not in log, log[-4000:]
  assert losses(workdir) == losses(uninterrupted)
  (step, got), (_, want) = restore_arrays(str(workdir)), restore_arrays(str(uninterrupted))
  assert step == 6
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves) > 0
  for a, b in zip(got_leaves, want_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_launch_notices_a_dead_process_while_an_earlier_one_runs(tmp_path, monkeypatch, caplog):
  """Process 1 is killed while process 0 waits: the launcher sees it at once (it used to poll only up
  to the first live process) and tells process 0 through its STOKER_PEER_EXITED file, which process 0
  reads and exits on, well within its grace. A process that exits as all do together tells nobody."""
  child = tmp_path / 'child.py'
  child.write_text('import os, signal, sys, time\n'
                   "if os.environ['STOKER_PROCESS_ID'] == '1':\n"
                   '  os.kill(os.getpid(), signal.SIGKILL)\n'
                   "flag = os.environ['STOKER_PEER_EXITED']\n"
                   'for _ in range(600):\n'
                   '  if os.path.exists(flag):\n'
                   "    sys.exit(3 if open(flag).read() == 'Process 1 of this job exited with -9' else 4)\n"
                   '  time.sleep(0.1)\n')
  monkeypatch.setattr(sys, 'argv', [str(child)])
  start = time.monotonic()
  with caplog.at_level(logging.INFO):
    rc = run_local([], processes=2, devices_per_process=1, grace_s=30.0)
  assert rc == -signal.SIGKILL
  assert time.monotonic() - start < 20
  assert 'Process 1 exited with -9; the others have 30 s to finish.' in caplog.text
  assert 'Process 0 exited with 3.' in caplog.text  # by itself, told why

  # A together-exit (train/faults.py's EXIT_PREEMPTED: every process saved collectively and exits)
  # tells nobody: a peer still finishing that save must not switch to an emergency save.
  child.write_text('import os, sys, time\n'
                   "if os.environ['STOKER_PROCESS_ID'] == '1':\n"
                   '  sys.exit(80)\n'
                   'time.sleep(3)\n'
                   "sys.exit(5 if os.path.exists(os.environ['STOKER_PEER_EXITED']) else 0)\n")
  caplog.clear()
  start = time.monotonic()
  with caplog.at_level(logging.INFO):
    rc = run_local([], processes=2, devices_per_process=1, grace_s=20.0)
  assert rc == 80
  assert time.monotonic() - start < 15  # process 0 ended by itself, untold (5 would be logged)
  assert 'Process 0 exited' not in caplog.text
