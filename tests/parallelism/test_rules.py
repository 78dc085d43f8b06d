import jax
import pytest
from jax.sharding import PartitionSpec as P

from parallelism.mesh import MeshConfig, make_mesh
from parallelism.rules import logical_to_spec


@pytest.fixture(scope='module')
def mesh():
  return make_mesh(MeshConfig(ici=(1, 2, 4)))


def test_rules(mesh):
  assert logical_to_spec(('embed', 'mlp'), (64, 128), mesh) == P('fsdp', 'tensor')
  assert logical_to_spec(('layers', 'embed', 'heads', 'head_dim'), (2, 64, 8, 32), mesh) == P(
      None, 'fsdp', 'tensor', None)
  assert logical_to_spec(('batch', 'length'), (8, 16), mesh) == P('fsdp', None)  # data has size 1
  assert logical_to_spec((None, 'vocab'), (3, 128), mesh) == P(None, 'tensor')


def test_indivisible_dimension_is_replicated(mesh):
  # 2 key/value heads over tensor=4: that dimension stays whole on every device.
  assert logical_to_spec(('embed', 'kv_heads', 'head_dim'), (64, 2, 32), mesh) == P(
      'fsdp', None, None)


def test_batch_over_two_axes():
  mesh = make_mesh(MeshConfig(ici=(2, 4, 1)))
  assert logical_to_spec(('batch', 'length'), (16, 4), mesh) == P(('data', 'fsdp'), None)
  assert logical_to_spec(('batch', 'length'), (2, 4), mesh) == P('data', None)


def test_mesh_axis_used_once(mesh):
  assert logical_to_spec(('embed', 'embed'), (64, 64), mesh) == P('fsdp', None)


def test_unknown_axis(mesh):
  with pytest.raises(ValueError, match="'experts' has no rule"):
    logical_to_spec(('experts',), (8,), mesh)
