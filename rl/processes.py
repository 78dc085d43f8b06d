"""`stoker rl` as several processes (jax.distributed: parallelism/distributed.py): which of a step's
prompts each process samples, the global mini-batches its samples fill, the reductions of rewards
and timings over processes, and the policy's copy on each process's engine. With one process every
function here is the identity of the single-process loop.

Layout. The train state and each mini-batch live on the global mesh as in training: mini-batch m
holds the step's samples [m B, (m + 1) B) (B = prompts_per_step x group_size / minibatches, group
after group), its rows split over the mesh's batch axes. A process samples the prompts whose rows
its own devices hold (`Share`; on the usual mesh, where process i holds the i-th block of the batch
axes, process i takes the i-th block of each mini-batch's prompts), on its own engine, and puts
those rows in place (jax.make_array_from_callback): no sample crosses processes. A share holds whole
groups, so advantages need no other process. A request's seed comes from (step, its prompt's index
in the step, its sample index), never from the process, and the engine's sampling is batch-invariant
(serve/sampling.py), so a request samples the same tokens whatever the process count.

Reductions. Each process's per-sample rewards (with their rows) and its timings are gathered from
every process (multihost_utils.process_allgather; float64 carried as uint32 pairs, so nothing is
rounded) and reduced in the single-process order: every process computes, and process 0 logs, what
one process would have.

Weights. Each process's engine sits on the first of its devices in the mesh (no engine mesh: one
device, as in one process). After an update `engine_params` gives it the policy, leaf by leaf:
  * replicated over the mesh (pure data parallelism, the shipped recipe): the shard already on the
    engine's device is used as it is: no copy, no communication;
  * sharded over several processes' devices (fsdp or tensor axes across processes): one all-gather
    (a jitted identity to the replicated sharding) per update, all such leaves in one dispatch:
    each device receives the (n - 1)/n of the leaf it lacks, and every device of the mesh holds a
    whole copy until the next update;
  * sharded over this process's devices alone: one on-device gather (jax.device_put), as in one
    process.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class Share:
  """What this process samples each step: prompts (indices in the step, ascending) and the step's
  sample rows they make (prompt p's sample g is row p G + g), ascending."""

  prompts: tuple[int, ...]
  rows: tuple[int, ...]


def share(cfg, row_sharding: NamedSharding) -> Share:
  """This process's share of every step, from where the mini-batch's rows live on the mesh."""
  B, G = cfg.samples_per_step // cfg.minibatches, cfg.group_size
  local = set()
  for index in row_sharding.addressable_devices_indices_map((B, cfg.seq_len)).values():
    local.update(range(B)[index[0]])
  rows = tuple(sorted(m * B + r for m in range(cfg.minibatches) for r in local))
  prompts = tuple(sorted({r // G for r in rows}))
  if len(rows) != len(prompts) * G:
    raise ValueError(
        f'process {jax.process_index()} holds {len(local)} rows of each mini-batch of {B}, which '
        f'cuts groups of rl.group_size={G}: each process samples whole groups. Make rl.prompts_per_step '
        '/ rl.minibatches a multiple of the number of processes the batch is split over.')
  return Share(prompts, rows)


def engine_device(mesh: Mesh) -> jax.Device:
  """The device this process's engine samples on: the first of its own devices in the mesh."""
  here = jax.process_index()
  for d in mesh.devices.flat:
    if d.process_index == here:
      return d
  raise ValueError(f'process {here} has no device in the mesh {dict(mesh.shape)}; with several '
                   'processes leave rl.devices at 0 (all devices), or cover every process.')


def minibatches(cfg, local: dict[str, np.ndarray], mine: Share, shardings: dict) -> list[dict]:
  """Global mini-batches of rl/step.py KEYS from this process's packed rows (`local`, in
  `mine.rows` order), each row put where the mesh wants it."""
  B = cfg.samples_per_step // cfg.minibatches
  position = {r: i for i, r in enumerate(mine.rows)}

  def rows_of(key, m, index):
    picked = local[key][[position[r] for r in range(m * B, (m + 1) * B)[index[0]]]]
    return picked[(slice(None),) + tuple(index[1:])]

  return [{k: jax.make_array_from_callback((B,) + local[k].shape[1:], s,
                                           functools.partial(rows_of, k, m))
           for k, s in shardings.items()} for m in range(cfg.minibatches)]


def _allgather_f64(x: np.ndarray) -> np.ndarray:
  """[processes, *x.shape]: every process's `x`, exact (float64 as uint32 pairs, whatever
  jax_enable_x64 says)."""
  x = np.ascontiguousarray(x, np.float64)
  bits = np.asarray(multihost_utils.process_allgather(x.view(np.uint32)))
  return np.ascontiguousarray(bits).view(np.float64).reshape((-1,) + x.shape)


def gather_rows(rows, values: np.ndarray, capacity: int) -> np.ndarray:
  """Every process's `values` [len(rows), C] (row r of the whole at index rows[i]) as the whole
  [R, C] in row order, in `values`' dtype (carried as float64: exact for float32 and integers);
  a row several processes hold (replicas) is taken once. `capacity`: the most rows a process
  holds (every process passes the same)."""
  values = np.asarray(values).reshape(len(rows), -1)
  if jax.process_count() == 1:
    return values[np.argsort(rows, kind='stable')]
  padded = np.full((capacity, 1 + values.shape[1]), -1.0)
  padded[:len(rows), 0], padded[:len(rows), 1:] = rows, values
  whole = {}
  for part in _allgather_f64(padded):
    for row in part[part[:, 0] >= 0]:
      whole.setdefault(int(row[0]), row[1:])
  return np.stack([whole[r] for r in sorted(whole)]).astype(values.dtype)


def gather_max(values) -> np.ndarray:
  """Elementwise maximum over processes (a step waits for its slowest process)."""
  values = np.asarray(values, np.float64)
  return values if jax.process_count() == 1 else _allgather_f64(values).max(axis=0)


@functools.lru_cache(maxsize=None)
def _replicate(mesh: Mesh):
  return jax.jit(lambda leaves: leaves, out_shardings=NamedSharding(mesh, PartitionSpec()))


def engine_params(params, device: jax.Device, mesh: Mesh):
  """`params` (global arrays on the training mesh) as single-device arrays on `device`, for the
  engine; see the module docstring for what each kind of leaf costs."""
  leaves, treedef = jax.tree.flatten(params)
  spread = [i for i, x in enumerate(leaves) if not (x.is_fully_addressable or x.is_fully_replicated)]
  if spread:
    gathered = _replicate(mesh)([leaves[i] for i in spread])
    for i, x in zip(spread, gathered):
      leaves[i] = x
  out = []
  for x in leaves:
    if x.is_fully_replicated and device in x.sharding.device_set:
      out.append(next(s.data for s in x.addressable_shards if s.device == device))
    else:
      out.append(jax.device_put(x, device))
  return jax.tree.unflatten(treedef, out)


def handover_bytes(params, device: jax.Device) -> dict[str, int]:
  """What `engine_params` does with each byte of `params` at every update: read in place,
  all-gathered across processes, or copied on device."""
  out = {'in_place': 0, 'all_gathered': 0, 'copied': 0}
  for x in jax.tree.leaves(params):
    if not (x.is_fully_addressable or x.is_fully_replicated):
      kind = 'all_gathered'
    elif x.is_fully_replicated and device in x.sharding.device_set:
      kind = 'in_place'
    else:
      kind = 'copied'
    out[kind] += x.size * x.dtype.itemsize
  return out
