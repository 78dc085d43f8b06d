"""TPU slices by name ('v5e-256'): chips, hosts, and the GKE node labels that select them.

Names follow Cloud TPU: v5e and v6e count chips (v5e-256: 256 chips, 64 hosts of 4); v4 and v5p
count TensorCores, two per chip (v5p-128: 64 chips, 16 hosts of 4). GKE schedules a slice onto a
node pool labelled cloud.google.com/gke-tpu-accelerator and cloud.google.com/gke-tpu-topology, and
each host's pod asks for its chips as the google.com/tpu resource.
"""

from __future__ import annotations

import dataclasses
import math
import re

# generation -> (GKE accelerator label, TensorCores per chip, default topology by chip count).
_TOPOLOGY_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
                256: '16x16'}
_TOPOLOGY_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
                256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}
GENERATIONS = {
    'v4': ('tpu-v4-podslice', 2, _TOPOLOGY_3D),
    'v5e': ('tpu-v5-lite-podslice', 1, _TOPOLOGY_2D),
    'v5p': ('tpu-v5p-slice', 2, _TOPOLOGY_3D),
    'v6e': ('tpu-v6e-slice', 1, _TOPOLOGY_2D),
}
CHIPS_PER_HOST = 4  # every multi-host slice; v5e/v6e single hosts hold 1, 4 or 8 chips


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice: `hosts` pods of `chips_per_host` chips each."""

  name: str  # as given: 'v5e-256'
  generation: str  # 'v5e'
  chips: int
  topology: str  # cloud.google.com/gke-tpu-topology
  accelerator: str  # cloud.google.com/gke-tpu-accelerator

  @property
  def chips_per_host(self) -> int:
    if self.generation in ('v5e', 'v6e') and self.chips <= 8:
      return self.chips  # one host (ct5lp-hightpu-1t/4t/8t, ct6e-standard-1t/4t/8t)
    return CHIPS_PER_HOST

  @property
  def hosts(self) -> int:
    return self.chips // self.chips_per_host

  @property
  def device_kind(self) -> str:
    """The short name train/monitoring.py prices ('v5e')."""
    return self.generation


def parse_slice(name: str, topology: str | None = None) -> Slice:
  """A slice from its Cloud TPU name; `topology` overrides the default shape for its chip count."""
  m = re.fullmatch(r'(v4|v5e|v5p|v6e)-(\d+)', name.strip().lower())
  if not m:
    raise ValueError(f'TPU slice {name!r} not understood: write <generation>-<size> with generation '
                     f'one of {", ".join(GENERATIONS)} (for example v5e-256, v5p-128, v6e-8).')
  generation, size = m.group(1), int(m.group(2))
  accelerator, cores_per_chip, topologies = GENERATIONS[generation]
  if size % cores_per_chip:
    raise ValueError(f'TPU slice {name!r}: {generation} sizes count TensorCores, {cores_per_chip} '
                     f'per chip, so the size must be a multiple of {cores_per_chip}.')
  chips = size // cores_per_chip
  if topology is None:
    if chips not in topologies:
      raise ValueError(f'TPU slice {name!r} ({chips} chips) has no default topology; known chip '
                       f'counts for {generation}: {sorted(topologies)}. Pass the topology '
                       f'explicitly (--topology AxB{"xC" if topologies is _TOPOLOGY_3D else ""}).')
    topology = topologies[chips]
  dims = topology.split('x')
  want_dims = 3 if topologies is _TOPOLOGY_3D else 2
  if len(dims) != want_dims or not all(d.isdigit() and int(d) > 0 for d in dims) or \
     math.prod(int(d) for d in dims) != chips:
    raise ValueError(f'Topology {topology!r} does not fit TPU slice {name!r}: {generation} needs '
                     f'{want_dims} dimensions whose product is its {chips} chips.')
  s = Slice(name, generation, chips, topology, accelerator)
  if s.chips % s.chips_per_host:
    raise ValueError(f'TPU slice {name!r}: {chips} chips do not split into hosts of '
                     f'{s.chips_per_host}.')
  return s
