"""`stoker rl` as 2 processes x 1 CPU device (`stoker launch`, gloo collectives) against 1 process with
the same global batch, and a 2-process run resumed from its own step-1 checkpoint.

Each process samples its half of every mini-batch's groups on its own engine, with the request seeds
one process would use, and the rows meet in global arrays on a 2-way data-parallel mesh (rl/processes.py).
So the samples are the same tokens: every reward, length and held-out score equals the 1-process run's
exactly. Their float32 values are not bitwise the same, for two reasons: each engine batches half the
requests, so the sampler's log-probabilities round differently (~1e-7), and the gradient is summed in
another order (two partial sums, then an all-reduce). The loss and KL are means of O(1) per-token terms
that cancel to ~0.1, so they are compared with an absolute 2e-6 (3e-7 measured), the gradient norm with
a relative 1e-5 (1e-7 measured). Adam divides each coordinate's step by its own gradient magnitude, so
where a gradient is near zero a rounding-size difference moves that coordinate by up to the learning
rate (1e-4 seen with the default eps = 1e-8 at lr 1e-2); the test sets optimizer.eps = 1e-3, which
bounds that sensitivity by lr / eps = 10, and compares the parameters within 2e-6 (2.5e-7 measured).

Every run is a subprocess with PYTHONHASHSEED fixed. Two launches of the same 1-process command with
different hash seeds sample the same tokens but differ at float32 rounding (1e-6 in the loss, 1e-5
relative in the gradient norm): measured, it enters through the engine state the step-0 held-out
evaluation leaves behind (with rl.eval_every = 0 they are bitwise equal). With the seed fixed every run
is reproducible, and the resumed run ends bitwise equal to the uninterrupted one.
"""

import shutil

import jax
import numpy as np
import pytest

from rl import processes
from rl.config import load_rl_config
from tests.parallelism.launching import stoker
from tests.rl.tiny import GIN, TINY
from train.checkpoint import restore_arrays
from train.metrics import read_metrics

pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group('multiprocess')]

PARAMS = TINY + ['rl.steps = 2', 'rl.eval_every = 2', 'rl.beta = 0.05', 'checkpoint.every_steps = 1',
                 'optimizer.eps = 1e-3']
# What the samples alone decide (equal exactly), and what the gradient's summation order rounds.
SAMPLED = ('reward_', 'eval_', 'response_length', 'sampled_tokens')
ROUNDED = ('loss', 'kl', 'grad_norm', 'clip_fraction')  # clip_fraction: a count, so exact in practice


def run(workdir, processes: int):
  """`stoker rl` on 1 device (1 process) or as `processes` processes of 1 device each."""
  args = ['--host_devices', '1'] if processes == 1 else [
      'launch', '--local-processes', str(processes), '--devices-per-process', '1', '--']
  args += ['rl', '--gin_file', GIN, '--workdir', str(workdir)]
  for p in PARAMS + ['rl.devices = 0']:  # every device of the job
    args += ['--gin_param', p]
  result = stoker(*args, timeout=300, env={'PYTHONHASHSEED': '0'})
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def steps(workdir):
  return {r['step']: r for r in read_metrics(str(workdir))}


def final_params(workdir):
  step, state = restore_arrays(str(workdir))
  assert step == 2
  return jax.tree.leaves(state)


def test_two_processes_match_one_and_resume_bitwise(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  run(one, 1)
  result = run(two, 2)
  assert 'Joined a 2-process job as process 1' in result.stderr

  want, got = steps(one), steps(two)
  assert sorted(got) == sorted(want) == [0, 1, 2]
  for s in (0, 1, 2):
    assert got[s].keys() == want[s].keys()
    for k, v in want[s].items():
      if k.startswith(SAMPLED):
        assert got[s][k] == v, (s, k)
      elif k in ROUNDED:
        rtol, atol = (1e-5, 0) if k == 'grad_norm' else (0, 2e-6)
        np.testing.assert_allclose(got[s][k], v, rtol=rtol, atol=atol, err_msg=f'{s} {k}')
  assert got[2]['kl'] > 0 and got[2]['clip_fraction'] > 0  # the second mini-batch moved off the sampler
  for a, b in zip(final_params(one), final_params(two), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=0, atol=2e-6)

  resumed = tmp_path / 'resumed'
  shutil.copytree(two / 'checkpoints' / '1', resumed / 'checkpoints' / '1')
  result = run(resumed, 2)
  assert 'Resumed from the checkpoint of step 1 ' in result.stderr
  drop = lambda r: {k: v for k, v in r.items() if not k.endswith(('_s', '_per_s', 'time'))}
  assert sorted(steps(resumed)) == [2]
  assert drop(steps(resumed)[2]) == drop(got[2])
  for a, b in zip(final_params(two), final_params(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _FirstRows:
  """A row sharding of which this process's one device holds the first `n` rows."""

  def __init__(self, n):
    self.n = n

  def addressable_devices_indices_map(self, shape):
    return {'device': (slice(0, self.n), slice(None))}


def test_a_process_samples_the_whole_groups_its_devices_hold():
  cfg = load_rl_config([GIN], TINY)  # 4 prompts x 4 samples in 2 mini-batches of 8 rows
  # Rows 0-3 of mini-batch 0 (prompt 0's group) and of mini-batch 1 (step rows 8-11: prompt 2's).
  assert processes.share(cfg, _FirstRows(4)) == processes.Share((0, 2), (0, 1, 2, 3, 8, 9, 10, 11))
  assert processes.share(cfg, _FirstRows(8)).prompts == (0, 1, 2, 3)
  with pytest.raises(ValueError, match='cuts groups of rl.group_size=4'):
    processes.share(cfg, _FirstRows(2))
