"""Ragged paged attention as a Mosaic TPU Pallas kernel; the contract is serve/kernels/reference.py.

Grid (kv-head block, query block). Query blocks are aligned slices of the flattened token axis, so
one block may hold the tail of one prefill chunk, a run of decodes and the head of the next chunk.
A step walks the sequences that own rows of its block (the first one is precomputed per block) and,
for each, the blocks of pages its rows can see (causally: never past the last row's position):
  * kv_lens, block tables, cu_q_lens, num_seqs and the first sequence of each query block are
    scalar-prefetched into SMEM;
  * the page pools stay in HBM (memory_space=ANY); the pages of kv block j+1 are DMA'd into the
    other half of a double buffer in VMEM while block j is computed, page by page, skipping pages
    past what the block's rows need;
  * online softmax in float32 per row, with rows of other sequences left untouched by the maths
    itself (their mask is all false, so the running max, sum and output do not move);
  * GQA: queries are laid out [K, T * R, H] (R = N // K query heads per kv head, row = t * R + r), so
    one matmul serves all R heads that read a kv head.
The pools are viewed as [P, G, K * H] (a free reshape): a page's slice for a block of kb kv heads is
one [G, kb * H] DMA, and head h is the lane range h * H : (h + 1) * H of it, so no strided loads.
Off TPU the kernel runs in TPU interpret mode (slow: tests use tiny shapes), which simulates VMEM,
DMAs and semaphores; interpret='generic' picks Pallas' backend-independent interpreter instead (DMAs
become plain copies), which the head-sharded wrapper uses off TPU: TPU interpret mode synchronises
the devices of a shard_map with a barrier inside host callbacks, and on a CPU with fewer cores than
devices those callbacks can deadlock.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from serve.kernels import reference

# Finite, so exp(NEG - NEG) == 1 and a row with nothing visible yet never turns into NaN.
NEG = -0.7 * float(np.finfo(np.float32).max)
_LANES = 128  # m and l are kept broadcast over a full lane row (Mosaic stores whole vregs)
_SUBLANES = 8
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the kernel. They change speed and VMEM use, never results.

  queries_per_block: tokens of the flattened query axis per grid step (rows = tokens * N // K).
  pages_per_block: pages of one sequence per kv step (kv tokens per step = pages * G).
  kv_heads_per_block: kv heads per grid step; None takes all K.
  """

  queries_per_block: int = 32
  pages_per_block: int = 8
  kv_heads_per_block: int | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if value is None and f.name == 'kv_heads_per_block':
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'pallas_tpu BlockSizes.{f.name}={value!r} must be a positive int.')

  @classmethod
  def default(cls, N: int, K: int, G: int, M: int, dtype) -> BlockSizes:
    """~256 kv tokens per step, 32 query tokens, up to 8 kv heads."""
    del N, dtype  # the defaults fit every supported head count and dtype
    kb = max(d for d in range(1, min(K, 8) + 1) if K % d == 0)
    return cls(queries_per_block=32, pages_per_block=max(1, min(M, 256 // G)),
               kv_heads_per_block=kb)

  def check(self, N: int, K: int, M: int) -> None:
    """Raises ValueError unless these tiles fit q [T, N, H] and pools of K heads, M pages a slot."""
    kb = self.kv_heads_per_block or K
    R = N // K
    if K % kb:
      raise ValueError(f'pallas_tpu BlockSizes.kv_heads_per_block={kb} must divide K={K}.')
    if self.pages_per_block > M:
      raise ValueError(f'pallas_tpu BlockSizes.pages_per_block={self.pages_per_block} exceeds the '
                       f'M={M} pages a sequence can have; use at most {M}.')
    if (self.queries_per_block * R) % _SUBLANES:
      raise ValueError(f'pallas_tpu BlockSizes.queries_per_block={self.queries_per_block} times '
                       f'N // K = {R} query heads per kv head must be a multiple of {_SUBLANES} '
                       '(TPU sublanes); e.g. 8, 16 or 32 tokens.')


@functools.partial(jax.jit, static_argnames=('sm_scale', 'block_sizes', 'interpret'))
def ragged_paged_attention(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM,
                           cu_q_lens_B1, num_seqs_1, *, sm_scale: float | None = None,
                           block_sizes: BlockSizes | None = None, interpret=None) -> jax.Array:
  """Ragged paged attention (see reference.py) with the Mosaic TPU kernel; [T, N, H] out.

  sm_scale: logit scale, default H ** -0.5. block_sizes: default BlockSizes.default(...).
  interpret: None runs TPU interpret mode off TPU; True/False or a pltpu.InterpretParams force it;
    'generic' runs Pallas' backend-independent interpreter.
  """
  reference.check_shapes(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM,
                         cu_q_lens_B1, num_seqs_1)
  _, N, H = q_TNH.shape
  _, G, K, _ = k_pages_PGKH.shape
  M = block_tables_BM.shape[1]
  dtype = jnp.dtype(q_TNH.dtype)
  if dtype not in _DTYPES or k_pages_PGKH.dtype != dtype or v_pages_PGKH.dtype != dtype:
    raise ValueError(f'pallas_tpu needs q and pages of one dtype, float32 or bfloat16; got q '
                     f'{q_TNH.dtype}, k {k_pages_PGKH.dtype}, v {v_pages_PGKH.dtype}.')
  if H % 64:
    raise ValueError(f'pallas_tpu needs a head dim that is a multiple of 64 (TPU lanes); got '
                     f'H={H}. Use the reference backend for this model.')
  sublanes = _SUBLANES * 4 // dtype.itemsize
  if G % sublanes:
    raise ValueError(f'pallas_tpu needs a page size G that is a multiple of {sublanes} for '
                     f'{dtype.name} pages (TPU sublane tiling); got G={G}.')
  for name, x in (('kv_lens', kv_lens_B), ('block_tables', block_tables_BM),
                  ('cu_q_lens', cu_q_lens_B1), ('num_seqs', num_seqs_1)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f'pallas_tpu: {name} must be integers (int32); got {x.dtype}.')
  if block_sizes is None:
    block_sizes = BlockSizes.default(N, K, G, M, dtype)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f'pallas_tpu: block_sizes must be a pallas_tpu.BlockSizes; got '
                     f'{type(block_sizes).__name__}.')
  block_sizes.check(N, K, M)
  if interpret is None:
    interpret = jax.default_backend() != 'tpu'
  if interpret is True:
    interpret = pltpu.InterpretParams()
  elif interpret == 'generic':
    interpret = True  # pallas_call's own meaning of True
  elif not (interpret is False or isinstance(interpret, pltpu.InterpretParams)):
    raise ValueError(f"pallas_tpu: interpret={interpret!r}; use None, True, False, 'generic' or a "
                     'pltpu.InterpretParams.')
  scale = H ** -0.5 if sm_scale is None else float(sm_scale)
  return _call(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1,
               num_seqs_1, sm_scale=scale, block_sizes=block_sizes, interpret=interpret)


def ragged_paged_attention_sharded(mesh: jax.sharding.Mesh, q_TNH, k_pages_PGKH, v_pages_PGKH,
                                   kv_lens_B, block_tables_BM, cu_q_lens_B1, num_seqs_1, *,
                                   axis: str = 'tensor', **options) -> jax.Array:
  """The kernel with heads split over mesh axis `axis` (tensor parallelism) under shard_map.

  Each device gets K / n kv heads of the pools and the query heads that read them (query head i
  reads kv head i // (N // K), so equal contiguous chunks of both line up), and all the metadata;
  the output [T, N, H] is split over heads like q. Other mesh axes replicate. `options` go to
  ragged_paged_attention (sm_scale, block_sizes, interpret); off TPU interpret defaults to
  'generic' here (see the module docstring).
  """
  if options.get('interpret') is None and jax.default_backend() != 'tpu':
    options = dict(options, interpret='generic')
  return reference.shard_over_heads(
      functools.partial(ragged_paged_attention, **options), mesh, axis, 'pallas_tpu',
      q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1, num_seqs_1)


def _call(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1, num_seqs_1,
          *, sm_scale, block_sizes, interpret):
  """Lays q out per kv head, finds each query block's first sequence, runs the kernel."""
  T, N, H = q_TNH.shape
  _, G, K, _ = k_pages_PGKH.shape
  B, M = block_tables_BM.shape
  R = N // K
  bq, bkv = block_sizes.queries_per_block, block_sizes.pages_per_block
  kb = block_sizes.kv_heads_per_block or K
  num_q_blocks = pl.cdiv(T, bq)
  Tp = num_q_blocks * bq

  num_seqs_1 = num_seqs_1.astype(jnp.int32)
  # Entries past num_seqs are unspecified; make them flat so searches over cu stay monotone.
  cu_B1 = cu_q_lens_B1.astype(jnp.int32)
  cu_B1 = jnp.where(jnp.arange(B + 1) <= num_seqs_1[0], cu_B1, cu_B1[num_seqs_1[0]])
  starts_Q = jnp.arange(num_q_blocks, dtype=jnp.int32) * bq
  first_seq_Q = jnp.clip(jnp.searchsorted(cu_B1, starts_Q, side='right') - 1, 0, B - 1)

  # [T, N, H] -> [K, Tp * R, H]: the R query heads of a kv head become consecutive rows.
  q_KTRH = jnp.transpose(q_TNH.reshape(T, K, R, H), (1, 0, 2, 3))
  q_KXH = jnp.pad(q_KTRH, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).reshape(K, Tp * R, H)

  rows = bq * R
  q_spec = pl.BlockSpec((kb, rows, H), lambda hb, qb, *_: (hb, qb, 0))
  kernel = functools.partial(_kernel, sm_scale=sm_scale, bq=bq, R=R, M=M)
  out_KXH = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(K // kb, num_q_blocks),
          in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=q_spec,
          scratch_shapes=[
              pltpu.VMEM((2, bkv, G, kb * H), k_pages_PGKH.dtype),  # k double buffer
              pltpu.VMEM((2, bkv, G, kb * H), v_pages_PGKH.dtype),  # v double buffer
              pltpu.SemaphoreType.DMA((2, 2)),  # [k/v, slot]
              pltpu.VMEM((kb, rows, _LANES), jnp.float32),  # running max m
              pltpu.VMEM((kb, rows, _LANES), jnp.float32),  # running sum l
              pltpu.VMEM((kb, rows, H), jnp.float32),  # unnormalised output
          ]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel')),
      out_shape=jax.ShapeDtypeStruct((K, Tp * R, H), q_TNH.dtype),
      interpret=interpret,
      name='stoker_ragged_paged_attention_tpu',
  )(kv_lens_B.astype(jnp.int32), block_tables_BM.astype(jnp.int32).reshape(B * M), cu_B1,
    num_seqs_1, first_seq_Q, q_KXH, k_pages_PGKH.reshape(-1, G, K * H),
    v_pages_PGKH.reshape(-1, G, K * H))

  out_TNH = jnp.transpose(out_KXH.reshape(K, Tp, R, H), (1, 0, 2, 3))[:T].reshape(T, N, H)
  return out_TNH


def _kernel(kv_lens_ref, tables_ref, cu_ref, num_seqs_ref, first_seq_ref,  # SMEM
            q_ref, k_hbm, v_hbm,  # q block [kb, rows, H] in VMEM; pools [P, G, K * H] in HBM
            o_ref,  # [kb, rows, H]
            k_buf, v_buf, sems, m_ref, l_ref, acc_ref,  # scratch
            *, sm_scale: float, bq: int, R: int, M: int):
  hb, qb = pl.program_id(0), pl.program_id(1)
  kb, rows, H = q_ref.shape
  _, bkv, G, _ = k_buf.shape
  S = bkv * G  # kv tokens per step
  blk_start = qb * bq
  blk_end = blk_start + bq
  num_seqs = num_seqs_ref[0]
  m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def page_copies(b, j, slot, n_pages, fn):
    """Applies fn (start or wait) to the DMA of each needed page of kv block j of sequence b."""
    for i in range(bkv):
      page = j * bkv + i

      @pl.when(page < n_pages)
      def _():
        page_id = tables_ref[b * M + jnp.minimum(page, M - 1)]
        for kv, (hbm, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
          fn(pltpu.make_async_copy(hbm.at[page_id, :, pl.ds(hb * kb * H, kb * H)],
                                   buf.at[slot, i], sems.at[kv, slot]))

  def seq_cond(b):
    return jnp.logical_and(b < num_seqs, cu_ref[b] < blk_end)

  def seq_body(b):
    q_start, q_end = cu_ref[b], cu_ref[b + 1]
    q_len, kv_len = q_end - q_start, kv_lens_ref[b]
    hi = jnp.minimum(q_end, blk_end)  # this block's rows of sequence b: [max(q_start, start), hi)
    need = kv_len - q_len + (hi - q_start)  # kv tokens the block's last row of b can see
    has_rows = jnp.logical_and(hi > jnp.maximum(q_start, blk_start), q_len > 0)
    num_kv_blocks = jnp.where(has_rows, _cdiv(need, S), 0)
    n_pages = _cdiv(need, G)

    @pl.when(num_kv_blocks > 0)
    def _():
      page_copies(b, 0, 0, n_pages, lambda c: c.start())

    def kv_body(j, carry):
      slot = lax.rem(j, 2)

      @pl.when(j + 1 < num_kv_blocks)
      def _():
        page_copies(b, j + 1, 1 - slot, n_pages, lambda c: c.start())

      page_copies(b, j, slot, n_pages, lambda c: c.wait())
      t_rows = blk_start + lax.div(lax.broadcasted_iota(jnp.int32, (rows, S), 0), R)
      c_cols = j * S + lax.broadcasted_iota(jnp.int32, (rows, S), 1)
      visible = ((t_rows >= q_start) & (t_rows < q_end)
                 & (c_cols <= kv_len - q_len + (t_rows - q_start)))
      loaded = j * S + lax.broadcasted_iota(jnp.int32, (S, H), 0) < need
      for h in range(kb):
        k_SH = k_buf[slot, :, :, pl.ds(h * H, H)].reshape(S, H)
        # Rows past what was DMA'd are stale (NaN in interpret mode); 0 * NaN would leak into p @ v.
        v_SH = jnp.where(loaded, v_buf[slot, :, :, pl.ds(h * H, H)].reshape(S, H), 0)
        _attend(h, q_ref, k_SH, v_SH, m_ref, l_ref, acc_ref, visible, sm_scale=sm_scale)
      return carry

    lax.fori_loop(0, num_kv_blocks, kv_body, 0)
    return b + 1

  lax.while_loop(seq_cond, seq_body, first_seq_ref[qb])
  l = l_ref[...][:, :, :1]
  o_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0).astype(o_ref.dtype)


def _cdiv(a, b: int):
  """Ceiling division of non-negative ints; lax.div skips the sign fix-ups of jnp's // (TPU scalars)."""
  return lax.div(a + (b - 1), b)


def _attend(h, q_ref, k_SH, v_SH, m_ref, l_ref, acc_ref, visible_XS, *, sm_scale):
  """One online-softmax step of kv head h over one kv block, for every row of the query block."""
  q_XH = q_ref[h]
  precision = lax.Precision.HIGHEST if q_XH.dtype == jnp.float32 else None
  s_XS = lax.dot_general(q_XH, k_SH, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32) * sm_scale
  s_XS = jnp.where(visible_XS, s_XS, NEG)
  m_prev = m_ref[h][:, :1]
  m_next = jnp.maximum(m_prev, jnp.max(s_XS, axis=1, keepdims=True))
  p_XS = jnp.where(visible_XS, jnp.exp(s_XS - m_next), 0.0)
  alpha = jnp.exp(m_prev - m_next)
  l_next = alpha * l_ref[h][:, :1] + jnp.sum(p_XS, axis=1, keepdims=True)
  pv_XH = lax.dot_general(p_XS.astype(v_SH.dtype), v_SH, (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=jnp.float32)
  acc_ref[h] = alpha * acc_ref[h] + pv_XH
  m_ref[h] = jnp.broadcast_to(m_next, m_ref.shape[1:])
  l_ref[h] = jnp.broadcast_to(l_next, l_ref.shape[1:])

