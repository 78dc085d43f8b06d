import jax
import numpy as np
import pytest

from parallelism.mesh import MeshConfig, fill, make_mesh


@pytest.mark.parametrize('ici,expected', [
    ((8, 1, 1), (8, 1, 1)), ((2, 4, 1), (2, 4, 1)), ((1, 2, 4), (1, 2, 4)),
    ((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 1, -1), (1, 1, 8)),
])
def test_mesh_shapes(ici, expected):
  mesh = make_mesh(MeshConfig(ici=ici))
  assert tuple(mesh.shape.values()) == expected
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_dcn_groups_are_outer():
  """With dcn=(2,1,1), the 'data' axis steps over slices: its first half is one group of devices."""
  mesh = make_mesh(MeshConfig(ici=(2, 1, 2), dcn=(2, 1, 1)))
  assert tuple(mesh.shape.values()) == (4, 1, 2)
  groups = [{d.id // 4 for d in mesh.devices[i].flat} for i in range(4)]
  assert groups[0] == groups[1] and groups[2] == groups[3] and groups[0] != groups[2]


def test_one_device():
  mesh = make_mesh(MeshConfig(ici=(1, 1, 1)), devices=jax.devices()[:1])
  assert mesh.devices.size == 1


def test_extra_axes():
  mesh = make_mesh(MeshConfig(axes=('data', 'fsdp', 'tensor', 'sequence'), ici=(2, 2, 1, 2),
                              dcn=(1, 1, 1, 1)))
  assert mesh.shape['sequence'] == 2


@pytest.mark.parametrize('kwargs,message', [
    (dict(ici=(3, -1, 1)), 'not a multiple of 3'),
    (dict(ici=(2, 2, 1)), 'needs 4 devices but 8'),
    (dict(ici=(-1, -1, 1)), 'at most one -1'),
    (dict(ici=(8, 1)), 'one size per axis'),
    (dict(ici=(1, 1, 1), dcn=(3, 1, 1)), 'does not divide'),
])
def test_bad_meshes_name_the_problem(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(MeshConfig(**kwargs))


def test_fill():
  assert fill((-1, 2), 8, 'x') == (4, 2)
  assert fill((4, 2), 8, 'x') == (4, 2)
