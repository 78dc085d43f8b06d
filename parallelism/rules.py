"""The one table that maps logical axis names to mesh axes, and its application to shapes."""

from __future__ import annotations

import logging
import math
from typing import Sequence

from jax.sharding import Mesh, PartitionSpec

# Each logical axis maps to a tuple of mesh axes (sharded over their product) or to ().
# Parameters: FSDP shards the model width; tensor parallelism shards heads, MLP and vocabulary.
# Mixtures of experts: experts are split over 'expert', and so is the batch outside the experts
# (data-parallel attention). Dropless, the partitioner gathers an MoE layer's tokens over 'expert'
# and sums the experts' outputs back with all-reduces; with a capacity, each sequence's expert
# slots [G, E, C, D] move from ('batch') to ('expert_batch', 'expert'): all-to-alls (models/moe.py).
# Activations: the batch is split over every data-like axis.
Rules = tuple[tuple[str, tuple[str, ...]], ...]
DEFAULT_RULES: Rules = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('length', ()),  # room for 'sequence' parallelism
    ('act_embed', ()),
    ('embed', ('fsdp',)),
    ('heads', ('tensor',)),
    ('kv_heads', ('tensor',)),
    ('mlp', ('tensor',)),
    ('vocab', ('tensor',)),
    ('head_dim', ()),
    ('layers', ()),
    ('expert', ('expert',)),
    ('expert_batch', ('data', 'fsdp')),  # the batch inside the experts: 'batch' less 'expert'
)


def flax_rules(rules: Rules, mesh: Mesh) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
  """The table in the form `flax.linen.logical_axis_rules` takes, without axes absent from mesh."""
  out = []
  for name, axes in rules:
    present = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    out.append((name, present or None))
  return tuple(out)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
  """Maps one array's logical axis names to a PartitionSpec on `mesh`.

  A mesh axis is used at most once per array. If a dimension is not divisible by the mesh axes
  its rule names (e.g. 2 key/value heads over tensor=4), trailing mesh axes are dropped until it
  is, and that dimension is replicated over them: memory grows, results do not change.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape, strict=True):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f'Logical axis {name!r} has no rule; add it to the rule table '
                       f'(known: {sorted(table)}).')
    mesh_axes = [a for a in table[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
    while mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes):
      dropped = mesh_axes.pop()
      logging.info('Axis %r (size %d) is not divisible by mesh axis %r; replicating over it.',
                   name, dim, dropped)
    used.update(mesh_axes)
    spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
  return PartitionSpec(*spec)
