"""Ragged paged attention, the pure-JAX reference every kernel is tested against.

One call covers a whole engine step: the queries of all scheduled sequences (decodes of one token
and prefill chunks of many) are flattened into one token axis T, and the keys/values live in page
pools shared by all sequences.

Layouts (letters as in DESIGN.md; B here is the number of sequence slots, M pages per slot):
  q_TNH            queries of the step, sequence after sequence: sequence b owns rows
                   cu_q_lens_B1[b] : cu_q_lens_B1[b + 1].
  k_pages_PGKH,    page pools. Page p holds G consecutive tokens' keys/values. The new tokens' keys and
  v_pages_PGKH     values must already be written (the engine writes, then attends).
  kv_lens_B        int32, tokens in each sequence's cache *including* this step's new tokens.
  block_tables_BM  int32, page ids of each sequence in order; entries past the sequence's last page are
                   ignored (conventionally 0, the null page).
  cu_q_lens_B1     int32 [B + 1], cumulative query lengths; cu_q_lens_B1[0] == 0.
  num_seqs_1       int32 [1], sequences in use; rows at or past cu_q_lens_B1[num_seqs] are padding and
                   come out as zeros.

Query i of sequence b (0 <= i < q_len = cu[b+1] - cu[b]) sits at position kv_len - q_len + i and
attends causally to cache positions 0 .. kv_len - q_len + i. Query head n reads key/value head
n // (N // K). Softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_shapes(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1,
                 num_seqs_1) -> None:
  """Raises ValueError naming the offending argument; shared by every backend's wrapper."""
  if q_TNH.ndim != 3 or k_pages_PGKH.ndim != 4:
    raise ValueError(f'q must be [T, N, H] and pages [P, G, K, H]; got {q_TNH.shape} and '
                     f'{k_pages_PGKH.shape}.')
  if k_pages_PGKH.shape != v_pages_PGKH.shape:
    raise ValueError(f'key and value pools differ: {k_pages_PGKH.shape} vs {v_pages_PGKH.shape}.')
  _, N, H = q_TNH.shape
  _, _, K, Hk = k_pages_PGKH.shape
  if Hk != H or N % K:
    raise ValueError(f'head dims must match and N ({N}) be a multiple of K ({K}); q {q_TNH.shape}, '
                     f'pages {k_pages_PGKH.shape}.')
  B = kv_lens_B.shape[0]
  if block_tables_BM.ndim != 2 or block_tables_BM.shape[0] != B or cu_q_lens_B1.shape != (B + 1,):
    raise ValueError(f'need kv_lens [B], block_tables [B, M], cu_q_lens [B + 1]; got '
                     f'{kv_lens_B.shape}, {block_tables_BM.shape}, {cu_q_lens_B1.shape}.')
  if num_seqs_1.shape != (1,):
    raise ValueError(f'num_seqs must have shape [1]; got {num_seqs_1.shape}.')


@jax.jit
def ragged_paged_attention(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM,
                           cu_q_lens_B1, num_seqs_1, sm_scale: float | None = None) -> jax.Array:
  """Gathers each token's sequence's pages and runs masked softmax attention. [T, N, H] out."""
  check_shapes(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1,
               num_seqs_1)
  T, N, H = q_TNH.shape
  _, G, K, _ = k_pages_PGKH.shape
  M = block_tables_BM.shape[1]
  scale = H ** -0.5 if sm_scale is None else sm_scale

  t_T = jnp.arange(T, dtype=jnp.int32)
  seq_T = jnp.searchsorted(cu_q_lens_B1, t_T, side='right').astype(jnp.int32) - 1
  valid_T = t_T < cu_q_lens_B1[num_seqs_1[0]]
  seq_T = jnp.clip(seq_T, 0, kv_lens_B.shape[0] - 1)
  q_len_T = cu_q_lens_B1[seq_T + 1] - cu_q_lens_B1[seq_T]
  kv_len_T = kv_lens_B[seq_T]
  pos_T = kv_len_T - q_len_T + (t_T - cu_q_lens_B1[seq_T])

  pages_TM = block_tables_BM[seq_T]
  k_TSKH = k_pages_PGKH[pages_TM].reshape(T, M * G, K, H)
  v_TSKH = v_pages_PGKH[pages_TM].reshape(T, M * G, K, H)
  q_TKRH = q_TNH.reshape(T, K, N // K, H)
  logits_TKRS = jnp.einsum('TKRH,TSKH->TKRS', q_TKRH, k_TSKH,
                           preferred_element_type=jnp.float32) * scale
  s_S = jnp.arange(M * G, dtype=jnp.int32)
  mask_TS = (s_S[None, :] <= pos_T[:, None]) & valid_T[:, None]
  logits_TKRS = jnp.where(mask_TS[:, None, None], logits_TKRS, jnp.finfo(jnp.float32).min)
  probs_TKRS = jax.nn.softmax(logits_TKRS, axis=-1)
  out_TKRH = jnp.einsum('TKRS,TSKH->TKRH', probs_TKRS, v_TSKH.astype(jnp.float32))
  out_TNH = jnp.where(valid_T[:, None, None], out_TKRH.reshape(T, N, H), 0)
  return out_TNH.astype(q_TNH.dtype)


def shard_over_heads(kernel, mesh: jax.sharding.Mesh, axis: str, name: str, q_TNH, k_pages_PGKH,
                     v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1,
                     num_seqs_1) -> jax.Array:
  """Runs `kernel` (this module's signature) under shard_map with heads split over mesh axis `axis`:
  each device gets K / n kv heads of the pools and the query heads that read them (query head i
  reads kv head i // (N // K), so equal contiguous chunks line up) and all the metadata; the output
  is split over heads like q. Other mesh axes replicate. `name` names the kernel in errors."""
  if axis not in mesh.shape:
    raise ValueError(f'{name}: mesh axes {tuple(mesh.shape)} have no {axis!r} axis to split '
                     'heads over; pass axis= one of them.')
  ways, K = mesh.shape[axis], k_pages_PGKH.shape[2]
  if K % ways:
    raise ValueError(f'{name}: {K} kv heads cannot be split {ways} ways over mesh axis '
                     f'{axis!r}; use a tensor-parallel degree that divides K.')
  P = jax.sharding.PartitionSpec
  heads, pools, whole = P(None, axis, None), P(None, None, axis, None), P()
  in_specs = (heads, pools, pools, whole, whole, whole, whole)
  args = (q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1, num_seqs_1)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    # Explicit axes: shard_map takes inputs only as they are already laid out.
    args = tuple(jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
                 for x, spec in zip(args, in_specs))
  # check_vma=False: pallas_call declares no varying-manual-axes types for its outputs.
  return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=heads,
                       check_vma=False)(*args)
