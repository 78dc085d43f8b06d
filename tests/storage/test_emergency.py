"""Emergency checkpoints (train/emergency.py) of a multi-process job in a bucket workdir: a hang writes the
marked state and every process's data state as whole objects, and a restart finds and restores them, as
tests/train/test_recovery.py checks on local disk."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.storage import servers
from tests.storage.conftest import new_bucket, use_server
from tests.train.test_recovery import _Checkpoints, _Data
from train import emergency
from train.config import CheckpointConfig
from train.recovery import Recovery


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_a_hang_in_a_bucket_workdir_writes_and_restores_an_emergency_checkpoint(scheme, endpoints, monkeypatch):
  use_server(monkeypatch, scheme, endpoints[scheme])
  bucket = new_bucket(scheme, endpoints[scheme])
  workdir = f'{bucket}/run'
  recovery = Recovery(CheckpointConfig(), _Checkpoints(), workdir, restart=lambda: None, target=None,
                      data=_Data(), initial_data=None, multi_process=True)
  state = {'w': jnp.arange(6, dtype=jnp.float32), 'b': jnp.ones((2, 3), jnp.bfloat16)}
  recovery.record_data({4: {'pos': 4}})
  recovery.mark(4, state, {'pos': 4})
  recovery.on_hang()
  objects = servers.list_objects(scheme, endpoints[scheme], bucket.split('://')[1])
  assert {'run/emergency/data_process_0.json', 'run/emergency/4/process_0.npz',
          'run/emergency/4/process_0.json'} == set(objects)
  assert emergency.latest(workdir) == 4
  target = {'w': jnp.zeros(6, jnp.float32), 'b': jnp.zeros((2, 3), jnp.bfloat16)}
  restored, data_state = emergency.restore(workdir, 4, target)
  for name in state:
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]))
  assert data_state == {'pos': 4}
