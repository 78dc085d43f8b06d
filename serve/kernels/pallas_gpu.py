"""Ragged paged attention as a Triton-lowered Pallas kernel; the contract is serve/kernels/reference.py.

One program per (work item, kv head). A work item is up to `queries_per_block` consecutive query
tokens of one sequence: a decode is one item, a prefill chunk of 40 tokens is three items of 16. The
items are listed on device in the wrapper (a static upper bound of them are launched; the rest
exit at once). A program loads its rows of q once, then loops over its sequence's pages in blocks
of `pages_per_block`, gathering page ids from the block table, with an online softmax in float32,
stopping at the last kv position its last row can see (causal skipping for prefill chunks).

GQA: queries are laid out [K, T * Rp, H] with the R = N // K query heads of a kv head on
consecutive rows (row = t * Rp + r; Rp is R rounded up to a power of two, as Triton needs, with
zero rows for r >= R), so one dot serves every head that reads the kv head and the kv block is
loaded once for all of them. Rows are stored masked, so neighbouring items never overwrite each
other; rows no item owns (padding) are zeroed in the wrapper.
Off GPU the kernel runs in Pallas interpret mode (slow: tests use tiny shapes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from serve.kernels import reference

# Finite, so exp(NEG - NEG) == 1 and a row with nothing visible yet never turns into NaN.
NEG = -0.7 * float(np.finfo(np.float32).max)
_MIN_DOT = 16  # Triton's tensor-core dots want every dimension >= 16


def _pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch settings of the kernel. They change speed, never results.

  queries_per_block: query tokens of one sequence per program (a power of two); rows per program
    are this times N // K rounded up to a power of two, and must be >= 16.
  pages_per_block: pages per kv loop step; pages * G must be a power of two >= 16.
  num_warps, num_stages: Triton launch settings.
  """

  queries_per_block: int = 16
  pages_per_block: int = 8
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'pallas_gpu BlockSizes.{f.name}={value!r} must be a positive int.')
    if not _pow2(self.queries_per_block):
      raise ValueError(f'pallas_gpu BlockSizes.queries_per_block={self.queries_per_block} must be '
                       'a power of two (Triton block shapes are); e.g. 4, 8 or 16.')

  @classmethod
  def default(cls, N: int, K: int, G: int, M: int) -> BlockSizes:
    """32 rows (at least one token) per program and ~64 kv tokens (at least 16) per step."""
    Rp = pl.next_power_of_2(N // K)
    pages = max(1, min(M, 64 // G), pl.cdiv(_MIN_DOT, G))
    return cls(queries_per_block=max(1, 32 // Rp), pages_per_block=pages)

  def check(self, N: int, K: int, G: int) -> None:
    """Raises ValueError unless these tiles fit q of N heads and pools of K heads, pages of G."""
    rows = self.queries_per_block * pl.next_power_of_2(N // K)
    if rows < _MIN_DOT:
      raise ValueError(f'pallas_gpu BlockSizes.queries_per_block={self.queries_per_block} gives '
                       f'{rows} rows (tokens x N // K query heads per kv head, rounded up to a '
                       f'power of two); Triton dots need >= {_MIN_DOT}: raise it.')
    S = self.pages_per_block * G
    if not _pow2(S) or S < _MIN_DOT:
      raise ValueError(f'pallas_gpu BlockSizes.pages_per_block={self.pages_per_block} times page '
                       f'size G={G} = {S} kv tokens per step must be a power of two >= '
                       f'{_MIN_DOT}.')


@functools.partial(jax.jit, static_argnames=('sm_scale', 'block_sizes', 'interpret'))
def ragged_paged_attention(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM,
                           cu_q_lens_B1, num_seqs_1, *, sm_scale: float | None = None,
                           block_sizes: BlockSizes | None = None,
                           interpret: bool | None = None) -> jax.Array:
  """Ragged paged attention (see reference.py) with the Triton kernel; [T, N, H] out.

  sm_scale: logit scale, default H ** -0.5. block_sizes: default BlockSizes.default(...).
  interpret: None runs Pallas interpret mode off GPU.
  """
  reference.check_shapes(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM,
                         cu_q_lens_B1, num_seqs_1)
  _, N, H = q_TNH.shape
  _, G, K, _ = k_pages_PGKH.shape
  M = block_tables_BM.shape[1]
  if not q_TNH.dtype == k_pages_PGKH.dtype == v_pages_PGKH.dtype:
    raise ValueError(f'pallas_gpu needs q and pages of one dtype; got q {q_TNH.dtype}, k '
                     f'{k_pages_PGKH.dtype}, v {v_pages_PGKH.dtype}.')
  if not jnp.issubdtype(q_TNH.dtype, jnp.floating):
    raise ValueError(f'pallas_gpu needs floating-point q and pages; got {q_TNH.dtype}.')
  if not _pow2(H) or H < _MIN_DOT:
    raise ValueError(f'pallas_gpu needs a head dim that is a power of two >= {_MIN_DOT} (Triton '
                     f'block shapes); got H={H}. Use the reference backend for this model.')
  for name, x in (('kv_lens', kv_lens_B), ('block_tables', block_tables_BM),
                  ('cu_q_lens', cu_q_lens_B1), ('num_seqs', num_seqs_1)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f'pallas_gpu: {name} must be integers (int32); got {x.dtype}.')
  if block_sizes is None:
    block_sizes = BlockSizes.default(N, K, G, M)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f'pallas_gpu: block_sizes must be a pallas_gpu.BlockSizes; got '
                     f'{type(block_sizes).__name__}.')
  block_sizes.check(N, K, G)
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  scale = H ** -0.5 if sm_scale is None else float(sm_scale)
  return _call(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B.astype(jnp.int32),
               block_tables_BM.astype(jnp.int32), cu_q_lens_B1.astype(jnp.int32),
               num_seqs_1.astype(jnp.int32), sm_scale=scale, block_sizes=block_sizes,
               interpret=bool(interpret))


def ragged_paged_attention_sharded(mesh: jax.sharding.Mesh, q_TNH, k_pages_PGKH, v_pages_PGKH,
                                   kv_lens_B, block_tables_BM, cu_q_lens_B1, num_seqs_1, *,
                                   axis: str = 'tensor', **options) -> jax.Array:
  """The kernel with heads split over mesh axis `axis` (tensor parallelism) under shard_map.

  Each device gets K / n kv heads of the pools and the query heads that read them (query head i
  reads kv head i // (N // K), so equal contiguous chunks of both line up), and all the metadata;
  the output [T, N, H] is split over heads like q. Other mesh axes replicate. `options` go to
  ragged_paged_attention (sm_scale, block_sizes, interpret).
  """
  return reference.shard_over_heads(
      functools.partial(ragged_paged_attention, **options), mesh, axis, 'pallas_gpu',
      q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1, num_seqs_1)


def _work_items(cu_B1, num_seqs_1, bq: int, W: int):
  """(sequence, first token) of each of W items; sequence -1 marks items past the real ones."""
  B = cu_B1.shape[0] - 1
  in_use_B = jnp.arange(B) < num_seqs_1[0]
  items_B = jnp.where(in_use_B, pl.cdiv(cu_B1[1:] - cu_B1[:-1], bq), 0)
  ends_B = jnp.cumsum(items_B)
  w_W = jnp.arange(W, dtype=jnp.int32)
  seq_W = jnp.minimum(jnp.searchsorted(ends_B, w_W, side='right'), B - 1).astype(jnp.int32)
  t0_W = cu_B1[seq_W] + (w_W - (ends_B[seq_W] - items_B[seq_W])) * bq
  return jnp.where(w_W < ends_B[-1], seq_W, -1), t0_W.astype(jnp.int32)


def _call(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_B1, num_seqs_1, *,
          sm_scale, block_sizes, interpret):
  """Lays q out per kv head, lists the work items, runs the kernel, zeroes padding rows."""
  T, N, H = q_TNH.shape
  P, G, K, _ = k_pages_PGKH.shape
  B, M = block_tables_BM.shape
  R = N // K
  Rp = pl.next_power_of_2(R)
  bq = block_sizes.queries_per_block
  W = pl.cdiv(T, bq) + min(B, T)  # sum over sequences of cdiv(q_len, bq) never exceeds this
  Tp = T + bq  # an item's block may run past T; those rows are read, never stored
  seq_W, t0_W = _work_items(cu_B1, num_seqs_1, bq, W)

  q_KTRH = jnp.transpose(q_TNH.reshape(T, K, R, H), (1, 0, 2, 3))
  q_KXH = jnp.pad(q_KTRH, ((0, 0), (0, Tp - T), (0, Rp - R), (0, 0))).reshape(K, Tp * Rp, H)

  whole = pl.no_block_spec
  q_spec = pl.BlockSpec((None, Tp * Rp, H), lambda w, h: (h, 0, 0))
  kv_spec = pl.BlockSpec((P, G, None, H), lambda w, h: (0, 0, h, 0))
  out_KXH = pl.pallas_call(
      functools.partial(_kernel, sm_scale=sm_scale, bq=bq, Rp=Rp, M=M,
                        pages_per_block=block_sizes.pages_per_block),
      grid=(W, K),
      in_specs=[whole] * 5 + [q_spec, kv_spec, kv_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((K, Tp * Rp, H), q_TNH.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                           num_stages=block_sizes.num_stages),
      interpret=interpret,
      name='stoker_ragged_paged_attention_gpu',
  )(seq_W, t0_W, kv_lens_B, block_tables_BM.reshape(B * M), cu_B1, q_KXH, k_pages_PGKH,
    v_pages_PGKH)

  out_TNH = jnp.transpose(out_KXH.reshape(K, Tp, Rp, H)[:, :T, :R], (1, 0, 2, 3)).reshape(T, N, H)
  valid_T = jnp.arange(T) < cu_B1[num_seqs_1[0]]
  return jnp.where(valid_T[:, None, None], out_TNH, 0)


def _kernel(seq_ref, t0_ref, kv_lens_ref, tables_ref, cu_ref,  # whole small int arrays
            q_ref,  # [Tp * Rp, H] rows of this kv head
            k_ref, v_ref,  # [P, G, H] this kv head's pages
            o_ref,  # [Tp * Rp, H]
            *, sm_scale: float, bq: int, Rp: int, M: int, pages_per_block: int):
  w = pl.program_id(0)
  b = seq_ref[w]

  @pl.when(b >= 0)
  def _():
    _, G, H = k_ref.shape
    rows, S = bq * Rp, pages_per_block * G
    t0 = t0_ref[w]
    q_start, q_end, kv_len = cu_ref[b], cu_ref[b + 1], kv_lens_ref[b]
    hi = jnp.minimum(q_end, t0 + bq)  # this item's tokens: [t0, hi)
    need = kv_len - (q_end - q_start) + (hi - q_start)  # kv tokens its last row can see
    last_page = pl.cdiv(need, G) - 1

    q_XH = q_ref[pl.ds(t0 * Rp, rows), :]
    t_X = t0 + lax.broadcasted_iota(jnp.int32, (rows,), 0) // Rp
    pos_X = kv_len - q_end + t_X  # = kv_len - q_len + (t - q_start)
    live_X = t_X < hi
    precision = lax.Precision.HIGHEST if q_XH.dtype == jnp.float32 else None

    def body(j, carry):
      acc_XH, m_X, l_X = carry
      page_ids = tables_ref[b * M + jnp.minimum(j * pages_per_block + jnp.arange(pages_per_block),
                                                last_page)]
      k_SH = k_ref[page_ids].reshape(S, H)
      v_SH = v_ref[page_ids].reshape(S, H)
      c_S = j * S + lax.broadcasted_iota(jnp.int32, (S,), 0)
      # Clamped page ids repeat the last page past `need`: zero those rows of v (stale, maybe NaN).
      v_SH = jnp.where((c_S < need)[:, None], v_SH, jnp.zeros_like(v_SH))
      s_XS = lax.dot_general(q_XH, k_SH, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32) * sm_scale
      visible_XS = (c_S[None, :] <= pos_X[:, None]) & live_X[:, None]
      s_XS = jnp.where(visible_XS, s_XS, NEG)
      m_next = jnp.maximum(m_X, jnp.max(s_XS, axis=1))
      p_XS = jnp.where(visible_XS, jnp.exp(s_XS - m_next[:, None]), 0.0)
      alpha = jnp.exp(m_X - m_next)
      pv_XH = lax.dot_general(p_XS.astype(v_SH.dtype), v_SH, (((1,), (0,)), ((), ())),
                              precision=precision, preferred_element_type=jnp.float32)
      return (alpha[:, None] * acc_XH + pv_XH, m_next, alpha * l_X + jnp.sum(p_XS, axis=1))

    init = (jnp.zeros((rows, H), jnp.float32), jnp.full((rows,), NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc_XH, _, l_X = lax.fori_loop(0, pl.cdiv(need, S), body, init)
    out_XH = acc_XH / jnp.where(l_X > 0, l_X, 1.0)[:, None]
    plgpu.store(o_ref.at[pl.ds(t0 * Rp, rows), :], out_XH.astype(o_ref.dtype),
                mask=jnp.broadcast_to(live_X[:, None], (rows, H)))
