"""parallelism/distributed.py: which job the environment describes, and errors when half set."""

import pytest

from parallelism.distributed import ProcessSpec, from_env


def test_nothing_set_is_one_process():
  assert from_env({}) is None
  assert from_env({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None  # one task: one process
  assert from_env({'TPU_WORKER_HOSTNAMES': 'only-host'}) is None


def test_explicit_variables_and_kubernetes_pod_index():
  env = {'STOKER_COORDINATOR': 'job-0:1234', 'STOKER_NUM_PROCESSES': '4', 'STOKER_PROCESS_ID': '2'}
  assert from_env(env) == ProcessSpec('explicit', 'job-0:1234', 4, 2)
  env = {'STOKER_COORDINATOR': 'job-0:1234', 'STOKER_NUM_PROCESSES': '64',
         'JOB_COMPLETION_INDEX': '63'}
  assert from_env(env) == ProcessSpec('kubernetes', 'job-0:1234', 64, 63)


def test_slurm_and_cloud_tpu_are_left_to_jax():
  assert from_env({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}) == ProcessSpec('slurm')
  assert from_env({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3'}) == ProcessSpec('cloud_tpu')


@pytest.mark.parametrize('env,message', [
    ({'STOKER_COORDINATOR': 'a:1'}, 'STOKER_NUM_PROCESSES, STOKER_PROCESS_ID missing'),
    ({'STOKER_NUM_PROCESSES': '2', 'STOKER_PROCESS_ID': '0'}, 'STOKER_COORDINATOR missing'),
    ({'STOKER_COORDINATOR': 'a:1', 'STOKER_NUM_PROCESSES': 'two', 'STOKER_PROCESS_ID': '0'},
     "STOKER_NUM_PROCESSES='two' is not an integer"),
    ({'STOKER_COORDINATOR': 'a:1', 'STOKER_NUM_PROCESSES': '2', 'STOKER_PROCESS_ID': '2'},
     '0 <= process id < it; got 2 and 2'),
    ({'STOKER_COORDINATOR': 'a', 'STOKER_NUM_PROCESSES': '2', 'STOKER_PROCESS_ID': '1'},
     'must be host:port'),
])
def test_half_configured_environments_name_what_is_wrong(env, message):
  with pytest.raises(ValueError, match=message):
    from_env(env)
