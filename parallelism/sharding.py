"""Shardings for whole pytrees from the logical names their Variables carry; shape-first init."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
from flax import linen
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallelism.rules import DEFAULT_RULES, Rules, flax_rules, logical_to_spec


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """A NamedSharding for every array leaf of `tree` (concrete or abstract).

  Leaves inside an `nnx.Variable` with `out_sharding` metadata are sharded by the rules; this
  covers parameters and optimizer moments (optax maps Variables structure-preservingly), and a
  Variable whose value is itself a pytree of arrays (int8 weights: q and a scale with size-1 axes
  where q is contracted, each sharded by the same names). Every other leaf (step counters,
  scalars) is replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(x):
    if _is_variable(x):
      axes = x.get_metadata().get('out_sharding')
      if axes:
        return x.replace(jax.tree.map(
            lambda a: NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh, rules)), x.get_value()))
      return x.replace(jax.tree.map(lambda _: replicated, x.get_value()))
    return replicated

  return jax.tree.map(one, tree, is_leaf=_is_variable)


def batch_axes(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes a [B, ...] input batch is split over (the 'batch' rule, present axes only)."""
  return tuple(a for a in dict(rules)['batch'] if mesh.shape.get(a, 1) > 1)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [B, ...] input batch: rows split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules) or None, *[None] * (ndim - 1)))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Makes `mesh` and `rules` visible to the models' activation constraints while tracing."""
  with jax.set_mesh(mesh), linen.logical_axis_rules(flax_rules(rules, mesh)):
    yield


def init_sharded(create: Callable[[], Any], mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Shape-first init of any pytree (params, optimizer state): eval_shape -> shardings ->
  jit(create, out_shardings). Nothing is ever materialised whole on one device.

  Returns (tree, shardings).
  """
  shardings = logical_shardings(jax.eval_shape(create), mesh, rules)
  return jax.jit(create, out_shardings=shardings)(), shardings
