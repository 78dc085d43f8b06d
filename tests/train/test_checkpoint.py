"""Checkpoints and just-in-time recovery, against an uninterrupted run of the same config.

Every run here is the tiny_cpu.gin recipe shrunk (2 layers, width 64, synthetic data, 12 steps,
checkpoints every 4). The reference is one uninterrupted run; each failure class interrupts a run
at a step drawn at random (seeded per class), the run is resumed, and its final parameters and
optimizer state must equal the reference's bit for bit, having recomputed at most one step.
"""

import json
import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import configs
from parallelism.mesh import MeshConfig, make_mesh
from parallelism.sharding import logical_shardings
from train import faults
from train.checkpoint import Checkpoints, checkpoint_dir, restore_arrays
from train.loop import train
from train.metrics import read_metrics
from train.optimizer import make_optimizer
from train.step import abstract_state, fresh_state, init_train_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 12
PARAMS = [
    'model.num_layers=2', 'model.d_model=64', 'model.num_heads=4', 'model.num_kv_heads=2',
    'model.head_dim=16', 'model.mlp_dim=128', 'model.vocab_size=256',
    "data.source='synthetic'", 'data.eval_every=0', 'data.eval_batches=0',
    f'train.steps={STEPS}', 'train.batch_size=8', 'train.seq_len=32', 'train.log_every=1',
    'checkpoint.every_steps=4', 'checkpoint.keep=10', 'checkpoint.max_nonfinite_steps=2',
]
pytestmark = pytest.mark.xdist_group('checkpoint')


def config(*extra):
  return configs.load_train_config(['train/tiny_cpu.gin'], PARAMS + list(extra))


def fault_step(kind: str) -> int:
  """A random step, fixed per failure class, that is not a checkpoint step (and leaves room for
  a streak of three non-finite steps to be seen before the end)."""
  return random.Random(kind).choice([2, 3, 5, 6, 7])


def assert_bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference'))
  logged = train(config(), workdir, progress=False, config_text='reference')
  assert [r['step'] for r in logged] == list(range(1, STEPS + 1))
  step, arrays = restore_arrays(workdir)
  assert step == STEPS
  return workdir, arrays


def test_periodic_checkpoints_hold_state_data_and_config(reference):
  workdir, arrays = reference
  steps = sorted(int(d) for d in os.listdir(checkpoint_dir(workdir)) if d.isdigit())
  assert steps == [4, 8, 12]
  with open(os.path.join(checkpoint_dir(workdir), '8', 'config', 'metadata')) as f:
    saved = json.load(f)
  assert saved['gin'] == 'reference' and saved['train']['model']['d_model'] == 64
  data_files = os.listdir(os.path.join(checkpoint_dir(workdir), '8', 'data'))
  assert 'process-0-of-1.json' in data_files
  assert int(arrays['step']) == STEPS


def test_keep_and_resume_without_a_flag(reference, tmp_path):
  """A longer run on a finished workdir continues from its newest checkpoint."""
  workdir = str(tmp_path / 'w')
  train(config('checkpoint.keep=2'), workdir, progress=False)
  assert sorted(os.listdir(checkpoint_dir(workdir))) == ['12', '8']
  logged = train(config('checkpoint.keep=2', f'train.steps={STEPS + 4}'), workdir, progress=False)
  assert [r['step'] for r in logged] == [13, 14, 15, 16]
  assert sorted(os.listdir(checkpoint_dir(workdir))) == ['12', '16']
  assert [r['step'] for r in read_metrics(workdir)] == list(range(1, 17))


def test_a_checkpoint_from_before_a_new_model_field_resumes(reference, tmp_path):
  """A ModelConfig field added after a save (at its default) is no reason to refuse the save; a
  field that differs is."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'old')
  shutil.copytree(reference[0], workdir)
  path = os.path.join(checkpoint_dir(workdir), '12', 'config', 'metadata')
  with open(path) as f:
    saved = json.load(f)
  del saved['train']['model']['qk_norm']  # as if qk_norm (default False) came after this save
  with open(path, 'w') as f:
    json.dump(saved, f)
  cfg = config(f'train.steps={STEPS}')
  ckpts = Checkpoints(workdir, cfg.checkpoint, cfg)
  try:
    ckpts._check_model(12)  # pylint: disable=protected-access
    saved['train']['model']['rms_eps'] = 1e-3
    with open(path, 'w') as f:
      json.dump(saved, f)
    with pytest.raises(ValueError, match=r'another model.*rms_eps 0.001 vs 1e-05'):
      ckpts._check_model(12)  # pylint: disable=protected-access
  finally:
    ckpts.close()


@pytest.mark.parametrize('kind', ['exception', 'sigterm'])
def test_failure_in_a_step_saves_and_resumes_bitwise(reference, tmp_path, kind):
  _, expected = reference
  workdir, f = str(tmp_path / 'w'), fault_step(kind)
  cfg = config(f"fault.kind='{kind}'", f'fault.step={f}')
  with pytest.raises(faults.TrainingInterrupted) as raised:
    train(cfg, workdir, progress=False)
  if kind == 'exception':  # the state before step f: the resumed run recomputes step f only
    assert (raised.value.exit_code, raised.value.saved_step) == (faults.EXIT_STEP_FAILED, f)
  else:  # step f finishes first, so nothing is recomputed
    assert (raised.value.exit_code, raised.value.saved_step) == (faults.EXIT_PREEMPTED, f + 1)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard put the handler back
  logged = train(cfg, workdir, progress=False)
  assert logged[0]['step'] == raised.value.saved_step + 1
  assert_bitwise_equal(restore_arrays(workdir)[1], expected)


def test_transient_nonfinite_steps_roll_back_and_replay_bitwise(reference, tmp_path):
  _, expected = reference
  workdir, f = str(tmp_path / 'w'), fault_step('nonfinite')
  # 3 NaN steps > checkpoint.max_nonfinite_steps=2: roll back to the checkpoint before them.
  logged = train(config("fault.kind='nonfinite'", f'fault.step={f}', 'fault.count=3'), workdir,
                 progress=False)
  rollbacks = [r for r in read_metrics(workdir) if 'rollback_to' in r]
  assert [r['rollback_to'] for r in rollbacks] == [f // 4 * 4]
  assert logged[-1]['step'] == STEPS and logged[-1]['skipped_steps'] == 0
  assert_bitwise_equal(restore_arrays(workdir)[1], expected)


def test_persistent_nonfinite_steps_give_up_after_the_rollbacks(tmp_path):
  workdir = str(tmp_path / 'w')
  cfg = config("fault.kind='nonfinite'", 'fault.step=5', 'fault.count=1000',
               'checkpoint.max_rollbacks=2')
  with pytest.raises(faults.TrainingInterrupted) as raised:
    train(cfg, workdir, progress=False)
  assert raised.value.exit_code == faults.EXIT_NONFINITE
  assert [r['rollback_to'] for r in read_metrics(workdir) if 'rollback_to' in r] == [4, 4]


def stoker(*args):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  return subprocess.run([sys.executable, os.path.join(REPO, 'cli.py'), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def cli_args(workdir, *extra):
  args = ['train', '--gin_file', 'train/tiny_cpu.gin', '--workdir', str(workdir)]
  for p in PARAMS + list(extra):
    args += ['--gin_param', p]
  return args


def test_a_hang_is_saved_by_the_watchdog_and_supervise_resumes(reference, tmp_path):
  _, expected = reference
  workdir, f = tmp_path / 'w', fault_step('hang')
  result = stoker(*cli_args(workdir, "fault.kind='hang'", f'fault.step={f}',
                            'checkpoint.hang_timeout_s=4'), '--supervise', '--max_restarts', '1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'No training progress for 4 s' in result.stderr
  assert f'Training ended by exit code {faults.EXIT_HANG}' in result.stderr
  assert f'Resumed from the checkpoint of step {f} ' in result.stderr  # replays step f only
  assert_bitwise_equal(restore_arrays(workdir)[1], expected)


def test_sigkill_during_an_async_save_restarts_from_the_previous_checkpoint(reference, tmp_path):
  _, expected = reference
  workdir = tmp_path / 'w'
  args = cli_args(workdir, "fault.kind='kill_in_save'", 'fault.step=8')
  killed = stoker(*args)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  # Step 8 was being written: only its temporary directory exists; checkpoint 4 is complete.
  left = sorted(os.listdir(checkpoint_dir(workdir)))
  assert left[0] == '4' and len(left) == 2 and left[1].startswith('8.orbax-checkpoint-tmp'), left
  assert restore_arrays(workdir)[0] == 4
  resumed = stoker(*args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from the checkpoint of step 4 ' in resumed.stderr
  assert_bitwise_equal(restore_arrays(workdir)[1], expected)


@pytest.mark.parametrize('ici,devices', [((8, 1, 1), 8), ((4, 1, 1), 4), ((1, 2, 2), 4)])
def test_restore_onto_another_mesh_and_device_count(tmp_path, ici, devices):
  """Saved sharded as (data 2, fsdp 4); restored onto other shapes and fewer devices."""
  cfg = config()
  saved_on = make_mesh(MeshConfig(ici=(2, 4, 1)))
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  state, _ = init_train_state(cfg, saved_on, tx)
  state = state._replace(step=state.step + 3)
  ckpts = Checkpoints(str(tmp_path), cfg.checkpoint, cfg)
  ckpts.save(3, state, None, wait=True)
  expected = jax.device_get(state)

  mesh = make_mesh(MeshConfig(ici=ici), jax.devices()[:devices])
  shardings = logical_shardings(jax.eval_shape(lambda: fresh_state(cfg, tx)), mesh)
  restored, _ = ckpts.restore(3, abstract_state(cfg, tx, shardings))
  ckpts.close()
  assert_bitwise_equal(jax.device_get(restored), expected)
  for array, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert array.sharding == sharding and array.sharding.mesh.devices.size == devices
