"""train/recovery.py: what each failure class saves, and where a rollback resumes, worked out by
hand for a recorded checkpoint store (the real Orbax saves and bitwise resumes are in
test_checkpoint.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from train import emergency, faults
from train.config import CheckpointConfig
from train.recovery import Recovery


class _Manager:

  def __init__(self, steps):
    self.steps = list(steps)

  def all_steps(self):
    return list(self.steps)

  def delete(self, step):
    self.steps.remove(step)


class _Checkpoints:
  """Records what Recovery asks of train/checkpoint.Checkpoints."""

  def __init__(self, steps=()):
    self.manager = _Manager(steps)
    self.saved, self.restored, self.waits = [], [], 0

  def save(self, step, state, data_state, *, wait=False):
    self.saved.append((step, state, data_state, wait))

  def restore(self, step, target, data):
    self.restored.append((step, data))
    return f'state of {step}', None

  def wait(self):
    self.waits += 1


class _Data:

  def __init__(self):
    self.position = None

  def set_state(self, state):
    self.position = state


def _recovery(tmp_path, steps=(), events=None, **cfg):
  ckpts, data = _Checkpoints(steps), _Data()
  events = [] if events is None else events
  recovery = Recovery(CheckpointConfig(**cfg), ckpts, str(tmp_path), restart=lambda: 'fresh',
                      target='target', data=data, initial_data={'pos': 0}, event=events.append)
  return recovery, ckpts, data


def test_a_failing_step_saves_the_state_before_it(tmp_path):
  events = []
  recovery, ckpts, _ = _recovery(tmp_path, events=events)
  recovery.mark(7, 'state before 7', {'pos': 7})
  with pytest.raises(faults.TrainingInterrupted) as e:
    with recovery.guard_step(7):
      raise faults.FaultInjected('device error')
  assert e.value.exit_code == faults.EXIT_STEP_FAILED and e.value.saved_step == 7
  assert isinstance(e.value.__cause__, faults.FaultInjected)
  assert ckpts.saved == [(7, 'state before 7', {'pos': 7}, True)]
  assert events == ['just_in_time_saved']


def test_without_just_in_time_a_failing_step_saves_nothing(tmp_path):
  recovery, ckpts, _ = _recovery(tmp_path, just_in_time=False)
  recovery.mark(3, 'donated', {'pos': 3})
  with pytest.raises(faults.FaultInjected):
    with recovery.guard_step(3):
      raise faults.FaultInjected('device error')
  recovery.on_hang()
  assert ckpts.saved == []


def test_preemption_saves_the_state_after_the_finished_step(tmp_path):
  recovery, ckpts, _ = _recovery(tmp_path, just_in_time=False)
  recovery.mark(5, 'state after 4', {'pos': 5})
  with pytest.raises(faults.TrainingInterrupted, match='SIGTERM received') as e:
    recovery.preempt(signal.SIGTERM)
  assert e.value.exit_code == faults.EXIT_PREEMPTED and e.value.saved_step == 5
  assert ckpts.saved == [(5, 'state after 4', {'pos': 5}, True)]


def test_a_hang_saves_the_marked_state(tmp_path):
  recovery, ckpts, _ = _recovery(tmp_path)
  recovery.mark(2, 'state before 2', {'pos': 2})
  recovery.on_hang()
  assert ckpts.saved == [(2, 'state before 2', {'pos': 2}, True)]


def test_a_multi_process_hang_writes_an_emergency_checkpoint(tmp_path):
  ckpts = _Checkpoints()
  recovery = Recovery(CheckpointConfig(), ckpts, str(tmp_path), restart=lambda: None,
                      target=None, data=_Data(), initial_data=None, multi_process=True)
  state = {'w': jnp.arange(6, dtype=jnp.float32)}
  recovery.record_data({4: {'pos': 4}})
  recovery.mark(4, state, {'pos': 4})
  recovery.on_hang()
  assert ckpts.saved == [] and emergency.latest(str(tmp_path)) == 4
  target = {'w': jnp.zeros(6, jnp.float32)}
  restored, data_state = emergency.restore(str(tmp_path), 4, target)
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert data_state == {'pos': 4}


def test_rollback_resumes_before_the_streak_then_skips_the_data(tmp_path):
  # Checkpoints at 4, 8 and 12; steps 10..12 were non-finite (a streak of 3 ending at step 12):
  # the newest checkpoint at or before the streak's first step (10) is 8.
  recovery, ckpts, _ = _recovery(tmp_path, steps=(4, 8, 12), max_rollbacks=3)
  assert recovery.rollback(12, 3) == (8, 'state of 8')
  assert ckpts.manager.all_steps() == [4, 8]  # 12 was saved during the streak
  assert ckpts.restored == [(8, recovery._data)]  # the data replays from step 8
  # The same step fails again: the data is the cause, so its position is kept (skipping it).
  assert recovery.rollback(12, 3) == (8, 'state of 8')
  assert ckpts.restored[-1] == (8, None)
  assert recovery.rolled_back_at == [12, 12]


def test_rollback_without_an_earlier_checkpoint_restarts_from_scratch(tmp_path):
  recovery, ckpts, data = _recovery(tmp_path, steps=(4,))
  assert recovery.rollback(3, 3) == (0, 'fresh')
  assert ckpts.manager.all_steps() == [] and ckpts.restored == []
  assert data.position == {'pos': 0}


def test_rollbacks_give_up_after_max_rollbacks(tmp_path):
  recovery, _, _ = _recovery(tmp_path, max_rollbacks=1)
  recovery.rollback(5, 2)
  with pytest.raises(faults.TrainingInterrupted, match='after 1 rollbacks') as e:
    recovery.rollback(9, 2)
  assert e.value.exit_code == faults.EXIT_NONFINITE and e.value.saved_step is None


def test_watchdog_saves_at_once_when_the_launcher_says_a_peer_exited(tmp_path):
  """A survivor stuck in a collective with a dead peer saves within a poll of the launcher's file
  (parallelism/launch.py), not after checkpoint.hang_timeout_s (here 600 s), and exits EXIT_HANG."""
  flag = tmp_path / 'peer-exited'
  script = ('import time\nfrom train import faults\n'
            f"with faults.Watchdog(600.0, lambda: print('saved', flush=True), peer_exited={str(flag)!r}) as w:\n"
            '  w.beat()\n  time.sleep(60)\n')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.Popen([sys.executable, '-c', script], cwd=repo, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  time.sleep(3)
  assert proc.poll() is None  # no peer exited, 600 s not passed: it waits
  start = time.monotonic()
  flag.write_text('Process 1 of this job exited with -9')
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == faults.EXIT_HANG, err[-2000:]
  assert time.monotonic() - start < 10
  assert out == 'saved\n'
  assert 'Process 1 of this job exited with -9: saving what this process holds now' in err
