"""Device meshes from a config: ICI (within a slice) x DCN (across slices), -1 fills what is left."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis names and sizes. The final mesh has shape ici * dcn, axis by axis.

  `ici` splits the devices of one slice (or one host, for GPUs/CPU); `dcn` splits slices
  (or hosts) across the data-centre network. One entry of each may be -1: "whatever is left".
  Mixtures of experts add an 'expert' axis (e.g. axes=('data', 'fsdp', 'expert', 'tensor')):
  it splits the experts, and the batch everywhere else (parallelism/rules.py).
  """

  axes: tuple[str, ...] = ('data', 'fsdp', 'tensor')
  ici: tuple[int, ...] = (-1, 1, 1)
  dcn: tuple[int, ...] = (1, 1, 1)

  def __post_init__(self):
    object.__setattr__(self, 'axes', tuple(self.axes))
    object.__setattr__(self, 'ici', tuple(self.ici))
    object.__setattr__(self, 'dcn', tuple(self.dcn))
    if not len(self.axes) == len(self.ici) == len(self.dcn):
      raise ValueError(f'MeshConfig needs one size per axis: axes={self.axes}, ici={self.ici}, '
                       f'dcn={self.dcn}.')
    if len(set(self.axes)) != len(self.axes):
      raise ValueError(f'MeshConfig.axes has a repeated name: {self.axes}.')
    for name in ('ici', 'dcn'):
      sizes = getattr(self, name)
      if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f'MeshConfig.{name}={sizes}: sizes must be positive, with at most one -1.')


def fill(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Replaces a -1 in `sizes` so that their product is `total`, or raises naming the mismatch."""
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ValueError(f'{what}: {total} devices cannot be split as {tuple(sizes)} '
                       f'({total} is not a multiple of {known}).')
    sizes = tuple(total // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != total:
    raise ValueError(f'{what}: mesh {tuple(sizes)} needs {math.prod(sizes)} devices but '
                     f'{total} are available; use -1 for one axis to fill the rest.')
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh over `devices` (default: all), topology-aware where the platform allows."""
  devices = list(jax.devices() if devices is None else devices)
  num_slices = _num_slices(devices)
  dcn = fill(cfg.dcn, num_slices if -1 in cfg.dcn else math.prod(cfg.dcn), 'MeshConfig.dcn')
  num_groups = math.prod(dcn)
  if len(devices) % num_groups:
    raise ValueError(f'MeshConfig.dcn={dcn} asks for {num_groups} slices/hosts, which does not '
                     f'divide the {len(devices)} devices.')
  ici = fill(cfg.ici, len(devices) // num_groups, 'MeshConfig.ici')
  if num_groups == 1:
    array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  elif num_slices > 1 or jax.process_count() > 1:
    array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=num_slices == 1, allow_split_physical_axes=True)
  else:
    # One process, one slice, but a DCN split asked for (tests, or emulating multi-slice on
    # fake CPU devices): consecutive device groups play the role of slices.
    array = np.asarray(devices).reshape(dcn + ici)
    n = len(cfg.axes)
    array = array.transpose([i for pair in zip(range(n), range(n, 2 * n)) for i in pair])
    array = array.reshape([d * i for d, i in zip(dcn, ici)])
  return Mesh(array, cfg.axes, axis_types=(AxisType.Auto,) * len(cfg.axes))


def _num_slices(devices: Sequence[jax.Device]) -> int:
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  return len(slices)
