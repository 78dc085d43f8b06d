"""Ragged paged attention in plain JAX whose cost follows what the caches hold: the CPU engine's path.

Same contract as serve/kernels/reference.py (which stays the naive definition every kernel, this
one included, is tested against). The reference gathers, for every query token, every page of its
sequence's block table: T x M x G keys, whatever the sequences hold, so a 256-token prefill chunk
against a 64-page table gathers 256 x 1024 keys per layer. Here:

- Query tiles. The step's tokens are cut into tiles of Q consecutive tokens of one sequence
  (`tile_size`: up to T // 16; 1 for decode-sized steps), and each tile gathers its sequence's
  pages once: a prefill chunk of n tokens costs n / Q gathers, not n. A sequence's last tile may
  be partly empty; sum over sequences of ceil(q_len / Q) <= T / Q + B, the static tile count W.
- One sequence, one tile. A step that holds a single sequence (batch 1: a prefill chunk, a
  speculative verification of k + 1 tokens) runs it as one tile of T tokens, picked on device by
  `lax.cond`: its pages are gathered once, not once per token (a 4-token verification of a
  150-token context: 126 us per layer, against 186 us with a tile per token; 2-core CPU).
- Table widths. Each step attends over the narrowest of a few block-table widths (4 pages,
  doubling, up to M) that holds its longest live sequence: one compiled branch per width, picked
  on device by `lax.switch`, each a single pass (a loop over key blocks with an online softmax
  measured slower on XLA:CPU, which pays per iteration). A short context costs a narrow gather
  however wide the block table is.

Query head n reads key/value head n // (N // K); scores, softmax and sums in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from serve.kernels.reference import check_shapes


# Query rows per tile (kv heads x rows per kv head) up to which a tile's scores and sums run as one
# product over all its kv heads' keys at once, K times the FLOPs, the other heads' terms dropped:
# K and V are then read as gathered, [S K, H]. Per kv head, XLA:CPU first copies them into
# [K, S, H] (batch axes leading) around small batched products: a decode step of 16 sequences
# of the small preset (K = 4, 3 query rows each, 257-token contexts) ran 45.9 -> 43.4 ms so, as a
# whole step (2-core CPU, medians of 7 interleaved).
CROSS_ROWS = 16


def tile_size(T: int, B: int) -> int:
  """Tokens per query tile for a T-token step over B sequence slots: the power of two up to
  T // 16 that needs the fewest tiles (T / Q, plus B partial ones once Q > 1), the smaller on ties.
  One token a tile for decode-sized steps and many slots; 16-token tiles for a 256-token step."""
  def tiles(q):
    return -(-T // q) + (B if q > 1 else 0)
  q, best = 1, 1
  while q * 2 <= max(1, T // 16):
    q *= 2
    best = q if tiles(q) < tiles(best) else best
  return best


def tiles(T: int, B: int, num_seqs: int | None = None) -> tuple[int, int]:
  """(tokens per tile Q, static tile count W) of a T-token step over B slots: one tile of T tokens
  when the step holds one sequence (num_seqs == 1), else tile_size's (None: the general bound)."""
  if num_seqs == 1:
    return T, 1
  Q = tile_size(T, B)
  return Q, -(-T // Q) + (B if Q > 1 else 0)


def table_widths(M: int, narrowest: int = 4) -> tuple[int, ...]:
  """The block-table widths (pages) a step may attend over: narrowest, doubling, up to M."""
  out, w = [], narrowest
  while w < M:
    out.append(w)
    w *= 2
  return tuple(out) + (M,)


@functools.partial(jax.jit, static_argnames=('sm_scale',))
def ragged_paged_attention(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM,
                           cu_q_lens_B1, num_seqs_1, sm_scale: float | None = None) -> jax.Array:
  """[T, N, H] attention outputs; padding tokens (at or past cu_q_lens_B1[num_seqs]) are zeros."""
  check_shapes(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1,
               num_seqs_1)
  T, _, H = q_TNH.shape
  B = block_tables_BM.shape[0]
  scale = H ** -0.5 if sm_scale is None else sm_scale
  # Whole pages as rows of [P, G * K * H], merged before any branch: a plain row gather (faster
  # on XLA:CPU than one over [P, G, K, H]), and branches that take no 4-D pool, whose layout XLA
  # chose otherwise when K == 1 (MQA) and copied whole into each branch.
  P, G, K, _ = k_pages_PGKH.shape
  run = functools.partial(_attend, q_TNH.astype(jnp.float32) * scale, k_pages_PGKH.reshape(P, -1),
                          v_pages_PGKH.reshape(P, -1), G, K, kv_lens_B, block_tables_BM, cu_q_lens_B1,
                          num_seqs_1)
  many, one = tiles(T, B), tiles(T, B, 1)
  if many == one:
    out_TNH = run(*many)
  else:
    out_TNH = jax.lax.cond(num_seqs_1[0] == 1, lambda: run(*one), lambda: run(*many))
  return out_TNH.astype(q_TNH.dtype)


def _attend(q_TNH, k_pages_PC, v_pages_PC, G: int, K: int, kv_lens_B, block_tables_BM, cu_q_lens_B1,
            num_seqs_1, Q: int, W: int) -> jax.Array:
  """ragged_paged_attention in W static tiles of Q tokens (queries already scaled; pages as rows of
  G * K * H), float32."""
  T, N, H = q_TNH.shape
  B, M = block_tables_BM.shape
  R = N // K  # query heads per kv head
  X = Q * R  # query rows per (tile, kv head)

  # Tiles: sequence b owns tiles tile_cu[b] .. tile_cu[b + 1] - 1, in token order.
  live_B = jnp.arange(B, dtype=jnp.int32) < num_seqs_1[0]
  q_len_B = jnp.where(live_B, cu_q_lens_B1[1:] - cu_q_lens_B1[:-1], 0)
  kv_len_B = jnp.where(live_B, kv_lens_B, 0)
  tile_cu_B1 = jnp.concatenate([jnp.zeros(1, jnp.int32),
                                jnp.cumsum((q_len_B + Q - 1) // Q, dtype=jnp.int32)])
  w_W = jnp.arange(W, dtype=jnp.int32)
  # compare_all: a few hundred comparisons, where the default search is a loop (XLA:CPU pays per
  # iteration, each layer).
  seq_W = jnp.searchsorted(tile_cu_B1, w_W, side='right', method='compare_all').astype(jnp.int32)
  seq_W = jnp.clip(seq_W - 1, 0, B - 1)
  first_W = (w_W - tile_cu_B1[seq_W]) * Q  # the tile's first token, counted within its chunk
  local_WQ = first_W[:, None] + jnp.arange(Q, dtype=jnp.int32)[None]
  valid_WQ = (local_WQ < q_len_B[seq_W][:, None]) & (w_W < tile_cu_B1[B])[:, None]
  # Query i of a chunk sits at position kv_len - q_len + i; -1 masks every key for empty rows.
  pos_WQ = jnp.where(valid_WQ, (kv_len_B - q_len_B)[seq_W][:, None] + local_WQ, -1)
  rows_WQ = jnp.clip(cu_q_lens_B1[seq_W][:, None] + local_WQ, 0, T - 1)
  q_WQKRH = q_TNH[rows_WQ].reshape(W, Q, K, R, H)
  q_WKXH = q_WQKRH.transpose(0, 2, 1, 3, 4).reshape(W, K, X, H)
  pos_WKX = jnp.broadcast_to(pos_WQ[:, None, :, None], (W, K, Q, R)).reshape(W, K, X)

  # One branch per table width: the step attends over the narrowest width that holds its longest
  # live sequence, in one pass (a switch, not a loop: XLA:CPU pays per loop iteration).
  widths = table_widths(M)
  tables_WM = block_tables_BM[seq_W]

  def attend(width: int):
    def run():
      S = width * G
      pages_WC = tables_WM[:, :width]
      k_WSKH = jnp.take(k_pages_PC, pages_WC, axis=0, mode='clip').reshape(W, S, K, H)
      v_WSKH = jnp.take(v_pages_PC, pages_WC, axis=0, mode='clip').reshape(W, S, K, H)
      if X * K <= CROSS_ROWS:  # see CROSS_ROWS
        k_WJH, v_WJH = k_WSKH.reshape(W, S * K, H), v_WSKH.reshape(W, S * K, H).astype(jnp.float32)
        s_WSKKX = jnp.einsum('WJH,WKXH->WJKX', k_WJH, q_WKXH,
                             preferred_element_type=jnp.float32).reshape(W, S, K, K, X)
        s_WKXS = jnp.einsum('WSKKX->WKXS', s_WSKKX)  # each kv head's own query rows
      else:
        s_WKXS = jnp.einsum('WKXH,WSKH->WKXS', q_WKXH, k_WSKH, preferred_element_type=jnp.float32)
      key_pos_111S = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
      s_WKXS = jnp.where(key_pos_111S <= pos_WKX[..., None], s_WKXS, jnp.finfo(jnp.float32).min)
      p_WKXS = jax.nn.softmax(s_WKXS, axis=-1)
      if X * K <= CROSS_ROWS:  # zeros where a row meets another kv head's values
        p_WKXSK = p_WKXS[..., None] * jnp.eye(K, dtype=p_WKXS.dtype)[None, :, None, None, :]
        return jnp.einsum('WYJ,WJH->WYH', p_WKXSK.reshape(W, K * X, S * K), v_WJH).reshape(W, K, X, H)
      return jnp.einsum('WKXS,WSKH->WKXH', p_WKXS, v_WSKH.astype(jnp.float32))
    return run

  needed_pages = (jnp.max(kv_len_B) + G - 1) // G
  branch = jnp.searchsorted(jnp.asarray(widths, jnp.int32), needed_pages, side='left',
                            method='compare_all')
  out_WKXH = jax.lax.switch(jnp.minimum(branch, len(widths) - 1), [attend(w) for w in widths])
  out_YNH = out_WKXH.reshape(W, K, Q, R, H).transpose(0, 2, 1, 3, 4).reshape(W * Q, N, H)

  # Token t is row (t - cu[b]) of its sequence's chunk: tile tile_cu[b] + row // Q, row % Q in it.
  t_T = jnp.arange(T, dtype=jnp.int32)
  seq_T = jnp.searchsorted(cu_q_lens_B1, t_T, side='right', method='compare_all').astype(jnp.int32)
  seq_T = jnp.clip(seq_T - 1, 0, B - 1)
  row_T = t_T - cu_q_lens_B1[seq_T]
  index_T = jnp.clip(tile_cu_B1[seq_T] * Q + row_T, 0, W * Q - 1)
  valid_T = t_T < cu_q_lens_B1[num_seqs_1[0]]
  out_TNH = jnp.where(valid_T[:, None, None], out_YNH[index_T], 0)
  return out_TNH
