"""`stoker serve --lora NAME=gs://...`: a PEFT adapter directory in a bucket reads as the same adapter read from
local disk, and a missing one is refused before a port is bound (serve/loader.py)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

import storage
from models import peft_files
from serve import loader
from tests.serve.server_fixtures import MODEL
from tests.serve.test_multi_lora import random_adapters
from tests.storage.conftest import new_bucket, use_server


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_a_bucket_adapter_reads_as_the_local_one(scheme, endpoints, monkeypatch, tmp_path):
  use_server(monkeypatch, scheme, endpoints[scheme])
  monkeypatch.setenv('STOKER_CACHE', str(tmp_path / 'cache'))
  bucket = new_bucket(scheme, endpoints[scheme])
  local = str(tmp_path / 'sql')
  peft_files.write(local, MODEL, *random_adapters(MODEL, 1, 4))
  for name in os.listdir(local):
    storage.put_file(os.path.join(local, name), f'{bucket}/adapters/sql/{name}')
  remote_adapters, remote_config = loader.read_adapter(f'{bucket}/adapters/sql', MODEL)
  local_adapters, local_config = loader.read_adapter(local, MODEL)
  assert remote_config == local_config
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(remote_adapters), nnx.to_pure_dict(local_adapters))
  with pytest.raises(FileNotFoundError, match='no such directory'):
    loader.check_adapters([('math', f'{bucket}/adapters/math')])
