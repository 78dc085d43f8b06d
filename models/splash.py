"""Splash attention: the TPU Pallas kernel of `jax.experimental`, wrapped to Stoker's layouts.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) works on one example with the
heads leading, q [N, T, H] and k/v [K, S, H] (or [S, H] for MQA), and supports grouped queries
natively: query head n reads key/value head n // (N // K), the same grouping as the reference
`attention.xla_attention`, so heads are never copied. The wrapper here takes [B, T, N, H] queries
and [B, S, K, H] keys/values, applies a causal mask AND'ed with segment ids, and returns
[B, T, N, H]. Off TPU the kernel runs in Pallas interpret mode (slow, for tests).

Sharding. Pallas calls cannot be split by XLA's partitioner, so when a mesh is set
(`jax.set_mesh`, as the train step does) the kernel runs under `jax.shard_map`:
  * the batch is split over the mesh axes the logical 'batch' rule names, and query heads over
    those of 'heads' (flax `logical_axis_rules` context); axes that do not divide the size are
    dropped from the end, and the array is replicated over them (slower, same results);
  * key/value heads are split like query heads when K divides evenly; otherwise, when each shard's
    query heads all read one key/value head (e.g. K=1, or K=8 over 16 ways), k/v stay replicated
    and each shard picks its head; otherwise heads are not split at all;
  * the sequence is never split ('length' rules are ignored): k/v of the whole sequence must be
    on each device, and sequence-sharded inputs are gathered first.
Without a mesh (a plain jit, or eager) the kernel is called directly; on TPU with sharded inputs
and no mesh set, XLA then gathers the inputs onto every device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

_LANES = 128  # the kernel tiles sequences in multiples of the TPU lane width


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the forward and backward kernels. They change speed, not results.

  Every size must be a multiple of 128 and divide the sequence length. `None` backward sizes
  take the forward ones.
  """

  block_q: int = 512
  block_kv: int = 512
  block_kv_compute: int | None = None  # inner kv loop; None: block_kv
  block_q_bwd: int | None = None
  block_kv_bwd: int | None = None

  def __post_init__(self):
    if self.block_kv_compute is None:
      object.__setattr__(self, 'block_kv_compute', self.block_kv)
    for name in ('block_q_bwd', 'block_kv_bwd'):
      if getattr(self, name) is None:
        object.__setattr__(self, name, getattr(self, name.removesuffix('_bwd')))
    for name, value in self._sizes():
      if not isinstance(value, int) or value <= 0 or value % _LANES:
        raise ValueError(f'splash BlockSizes.{name}={value!r} must be a positive multiple of '
                         f'{_LANES} (the TPU lane width); e.g. {_LANES}, 256 or 512.')
    if self.block_kv % self.block_kv_compute:
      raise ValueError(f'splash BlockSizes.block_kv={self.block_kv} must be a multiple of '
                       f'block_kv_compute={self.block_kv_compute}.')

  def _sizes(self) -> tuple[tuple[str, int], ...]:
    return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))

  @classmethod
  def for_seq_len(cls, seq_len: int, preferred: int = 512) -> BlockSizes:
    """The largest blocks up to `preferred` that tile `seq_len`, or a clear error."""
    if seq_len % _LANES:
      raise ValueError(f'seq_len {seq_len} is not a multiple of {_LANES}, which splash attention '
                       f"needs; pad sequences to a multiple of {_LANES} or use attention='xla'.")
    block = math.gcd(seq_len, preferred)
    return cls(block_q=block, block_kv=block)

  def check(self, seq_len: int) -> None:
    """Raises unless every block divides `seq_len`."""
    for name, value in self._sizes():
      if seq_len % value:
        raise ValueError(f'seq_len {seq_len} is not a multiple of {name}={value}; pad sequences '
                         f"to a multiple of {value}, choose smaller blocks, or use attention='xla'.")

  def to_kernel(self) -> kernel_lib.BlockSizes:
    return kernel_lib.BlockSizes(
        block_q=self.block_q, block_kv=self.block_kv, block_kv_compute=self.block_kv_compute,
        block_q_dkv=self.block_q_bwd, block_kv_dkv=self.block_kv_bwd,
        block_kv_dkv_compute=self.block_kv_bwd, block_q_dq=self.block_q_bwd,
        block_kv_dq=self.block_kv_bwd)


class _Plan(NamedTuple):
  """How the kernel is laid over the mesh (static; empty tuples mean 'not split')."""

  batch_axes: tuple[str, ...] = ()
  head_axes: tuple[str, ...] = ()
  kv_split: bool = False  # True: k/v heads split like q heads; False: k/v replicated


def splash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     segment_ids_BT: jax.Array, scale: float, *,
                     block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """Causal, segment-masked self-attention with the splash kernel; returns [B, T, N, H].

  Args:
    q_BTNH: queries. k_BSKH, v_BSKH: keys and values, S == T, N a multiple of K.
    segment_ids_BT: integer document ids; a token attends to s <= t of its own segment.
    scale: multiplies the logits (usually H ** -0.5).
    block_sizes: kernel tiles; default: the largest of 512/256/128 that divides T.
    interpret: run the kernel in Pallas interpret mode; default: on any backend but TPU.
  """
  if q_BTNH.ndim != 4 or k_BSKH.ndim != 4:
    raise ValueError(f'splash_attention wants q [B, T, N, H] and k/v [B, S, K, H]; got q '
                     f'{q_BTNH.shape}, k {k_BSKH.shape}.')
  B, T, N, H = q_BTNH.shape
  if k_BSKH.shape != v_BSKH.shape:
    raise ValueError(f'splash_attention: k {k_BSKH.shape} and v {v_BSKH.shape} differ in shape.')
  K = k_BSKH.shape[2]
  if k_BSKH.shape != (B, T, K, H):
    raise ValueError(f'splash_attention is self-attention: k/v must be [B={B}, S={T}, K, H={H}] '
                     f'to match q {q_BTNH.shape}; got {k_BSKH.shape}.')
  if N % K:
    raise ValueError(f'splash_attention: {N} query heads are not a multiple of {K} key/value '
                     'heads.')
  if segment_ids_BT.shape != (B, T) or not jnp.issubdtype(segment_ids_BT.dtype, jnp.integer):
    raise ValueError(f'splash_attention: segment ids must be integers of shape (B, T) = {(B, T)};'
                     f' got {segment_ids_BT.dtype} {segment_ids_BT.shape}.')
  if not q_BTNH.dtype == k_BSKH.dtype == v_BSKH.dtype:
    raise ValueError(f'splash_attention: q, k, v dtypes differ ({q_BTNH.dtype}, {k_BSKH.dtype}, '
                     f'{v_BSKH.dtype}); cast them to one dtype.')
  if block_sizes is None:
    block_sizes = BlockSizes.for_seq_len(T)
  block_sizes.check(T)
  if interpret is None:
    interpret = jax.default_backend() != 'tpu'
    if jax.default_backend() == 'gpu':
      logging.warning("splash attention is a TPU kernel: on GPU it runs in interpret mode, "
                      "correct but slow; use attention='cudnn' or 'xla' there.")
  return _splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT.astype(jnp.int32), scale=float(scale),
                 block_sizes=block_sizes, interpret=interpret, plan=_plan(B, N, K))


def _trim(axes, size: int, mesh, what: str) -> tuple[str, ...]:
  """Mesh axes (a rule's entry) present in `mesh`, dropped from the end until they divide `size`."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  axes = [a for a in axes if mesh.shape.get(a, 1) > 1]
  while axes and size % math.prod(mesh.shape[a] for a in axes):
    logging.info('splash: %s (size %d) is not divisible by mesh axis %r; replicating over it.',
                 what, size, axes[-1])
    axes.pop()
  return tuple(axes)


def _plan(B: int, N: int, K: int) -> _Plan | None:
  """None without a multi-device mesh; otherwise the shard_map layout (see module docstring)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  # Both names at once, so that flax never gives one mesh axis to both.
  batch_rule, heads_rule = linen.logical_to_mesh_axes(('batch', 'heads'))
  batch_axes = _trim(batch_rule, B, mesh, 'batch')
  head_axes = _trim(heads_rule, N, mesh, 'heads')
  ways = math.prod(mesh.shape[a] for a in head_axes)
  if K % ways and (N // K) % (N // ways):
    logging.warning('splash: %d query heads in %d groups cannot be split %d ways so that each '
                    'shard keeps whole groups or reads one key/value head; heads are replicated '
                    'over %s.', N, K, ways, head_axes)
    head_axes = ()
  return _Plan(batch_axes, head_axes, kv_split=bool(head_axes) and K % ways == 0)


@functools.partial(jax.jit, static_argnames=('scale', 'block_sizes', 'interpret', 'plan'))
def _splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, scale: float, block_sizes: BlockSizes,
            interpret: bool, plan: _Plan | None):
  body = functools.partial(_local_splash, scale=scale, block_sizes=block_sizes,
                           interpret=interpret, pick_axes=None)
  if plan is None:
    return body(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  spec = lambda axes: axes if len(axes) > 1 else (axes[0] if axes else None)  # noqa: E731
  batch, heads = spec(plan.batch_axes), spec(plan.head_axes)
  q_spec = jax.P(batch, None, heads, None)
  kv_spec = jax.P(batch, None, heads if plan.kv_split else None, None)
  if plan.head_axes and not plan.kv_split:
    body = functools.partial(body, pick_axes=plan.head_axes)
  in_specs = (q_spec, kv_spec, kv_spec, jax.P(batch, None))
  args = (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  if jax.sharding.AxisType.Explicit in jax.sharding.get_abstract_mesh().axis_types:
    # Explicit axes: shard_map takes inputs only as they are already laid out.
    args = tuple(jax.sharding.reshard(x, spec) for x, spec in zip(args, in_specs))
  # check_vma=False: the kernel's pallas_call declares no varying-manual-axes types for its
  # outputs (check_vma=True is refused); the specs above are the contract.
  return jax.shard_map(body, in_specs=in_specs, out_specs=q_spec, check_vma=False)(*args)


def _local_splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, scale: float,
                  block_sizes: BlockSizes, interpret: bool, pick_axes: tuple[str, ...] | None):
  """The kernel on this device's examples and heads.

  `pick_axes`: k/v arrive with all K heads while query heads are split over these axes so that
  each shard's query heads read one key/value head, which is sliced out here.
  """
  _, T, N, _ = q_BTNH.shape
  K = k_BSKH.shape[2]
  if pick_axes:
    # Shard i holds global query heads [i N, (i + 1) N); R = N ways / K is a multiple of N.
    kv_head = jax.lax.axis_index(pick_axes) * K // jax.lax.axis_size(pick_axes)
    k_BSKH = jax.lax.dynamic_slice_in_dim(k_BSKH, kv_head, 1, axis=2)
    v_BSKH = jax.lax.dynamic_slice_in_dim(v_BSKH, kv_head, 1, axis=2)
    K = 1
  is_mqa = K == 1
  mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((T, T))] * N)
  make = kernel_lib.make_splash_mqa if is_mqa else kernel_lib.make_splash_mha
  kernel = make(mask, block_sizes=block_sizes.to_kernel(), head_shards=1, q_seq_shards=1,
                interpret=interpret)
  # Scaling q before the kernel equals scaling the logits; the kernel itself has no scale.
  q_BNTH = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).transpose(0, 2, 1, 3)
  if is_mqa:
    k_B_, v_B_ = k_BSKH[:, :, 0], v_BSKH[:, :, 0]  # [B, S, H]
  else:
    k_B_, v_B_ = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)  # [B, K, S, H]

  def one(q_NTH, k, v, ids_T):
    return kernel(q_NTH, k, v, segment_ids=kernel_lib.SegmentIds(q=ids_T, kv=ids_T))

  out_BNTH = jax.vmap(one)(q_BNTH, k_B_, v_B_, segment_ids_BT)
  return out_BNTH.transpose(0, 2, 1, 3)
