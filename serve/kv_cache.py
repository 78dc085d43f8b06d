"""Paged key/value pools on device, and the write of a step's new keys/values into their pages.

The pools hold every layer: keys and values are [L, P, G, K, H]. Page 0 of each layer is the null
page: block-table entries past a sequence's last page point at it, and padding tokens write there;
attention masks every position at or past a sequence's length, so it is never read.

Inside the forward pass the pools keep their shape and are updated in place in the layer loop's
carry (no per-layer copies): layer l writes at [l, page, offset], and its attention reads the pools
as one [L * P, G, K, H] view (a free reshape; layer l's page p is page l * P + p) with the kernels'
[P, G, K, H] contract.

int8 pools (KVCacheSpec dtype 'int8'): keys and values are stored as int8 with a float32 scale per
token and kv head ([L, P, G, K] scale pools beside the pages; serve/quant.py has the math). The
attention kernels read full-precision pages, so each layer's [P, G, K, H] slice is dequantized
before its attention (`layer_pages`): the whole cache is int8, and one layer's worth exists in the
compute dtype at a time.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig
from parallelism.rules import DEFAULT_RULES, Rules, logical_to_spec
from serve import quant

# Logical names of the pool axes: kv heads follow the model's 'kv_heads' rule (tensor parallel).
POOL_AXES = ('layers', None, None, 'kv_heads', 'head_dim')


class KVPages(NamedTuple):
  """Key and value pools, [L, P, G, K, H] each (a pytree; donated to every step); with int8
  pools, their float32 scales [L, P, G, K] (None otherwise)."""

  k_LPGKH: jax.Array
  v_LPGKH: jax.Array
  k_scale_LPGK: jax.Array | None = None
  v_scale_LPGK: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
  """The shape and dtype of the pools."""

  num_layers: int  # L
  num_pages: int  # P, the null page 0 included
  page_size: int  # G
  num_kv_heads: int  # K
  head_dim: int  # H
  dtype: str = 'float32'  # or 'int8': quantized pages with per-token, per-head scales

  def __post_init__(self):
    for name in ('num_layers', 'num_kv_heads', 'head_dim', 'page_size'):
      if getattr(self, name) <= 0:
        raise ValueError(f'KVCacheSpec.{name} must be positive, got {getattr(self, name)}.')
    if self.num_pages < 2:
      raise ValueError(f'KVCacheSpec.num_pages={self.num_pages}: need the null page 0 and at '
                       'least one usable page.')

  @classmethod
  def for_model(cls, cfg: ModelConfig, num_pages: int, page_size: int,
                dtype: str | None = None) -> KVCacheSpec:
    """Pools for `cfg`; dtype defaults to the model's compute dtype on this platform."""
    dtype = dtype or cfg.compute_dtype(jax.default_backend())
    return cls(cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, dtype)

  @property
  def shape(self) -> tuple[int, int, int, int, int]:
    return (self.num_layers, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)

  @property
  def quantized(self) -> bool:
    return jnp.dtype(self.dtype) == jnp.int8

  @property
  def bytes_per_token(self) -> int:
    """Keys + values of one token over all layers (and their scales, for int8)."""
    per_head = self.head_dim * jnp.dtype(self.dtype).itemsize + (4 if self.quantized else 0)
    return 2 * self.num_layers * self.num_kv_heads * per_head

  @property
  def bytes(self) -> int:
    return self.bytes_per_token * self.num_pages * self.page_size


def pool_sharding(spec: KVCacheSpec, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Pools split over kv heads by the 'kv_heads' rule (replicated if K does not divide)."""
  return NamedSharding(mesh, logical_to_spec(POOL_AXES, spec.shape, mesh, rules))


def pages_sharding(spec: KVCacheSpec, sharding: NamedSharding) -> KVPages:
  """The KVPages of shardings for pools in `sharding` (scale pools split the same way)."""
  if not spec.quantized:
    return KVPages(sharding, sharding)
  scale = NamedSharding(sharding.mesh, PartitionSpec(*(tuple(sharding.spec) + (None,) * 5)[:4]))
  return KVPages(sharding, sharding, scale, scale)


def init_pages(spec: KVCacheSpec, sharding: NamedSharding | None = None) -> KVPages:
  """Zeroed pools, created directly in their sharding (never whole on one device)."""
  def create():
    zeros = jnp.zeros(spec.shape, spec.dtype)
    if not spec.quantized:
      return KVPages(zeros, zeros)
    scales = jnp.zeros(spec.shape[:-1], jnp.float32)
    return KVPages(zeros, zeros, scales, scales)
  out_shardings = None if sharding is None else pages_sharding(spec, sharding)
  return jax.jit(create, out_shardings=out_shardings)()


def slot_mapping(positions_T, block_tables_BM, cu_q_lens_B1, num_seqs_1, page_size: int):
  """Flat cache slot (page * G + offset) of each token; padding tokens get slot 0 (null page).

  Token t belongs to sequence b with cu_q_lens[b] <= t < cu_q_lens[b + 1]; its position picks
  the page (position // G, looked up in b's block table) and the offset in it.
  """
  T = positions_T.shape[0]
  t_T = jnp.arange(T, dtype=jnp.int32)
  seq_T = jnp.searchsorted(cu_q_lens_B1, t_T, side='right', method='compare_all').astype(jnp.int32) - 1
  seq_T = jnp.clip(seq_T, 0, block_tables_BM.shape[0] - 1)
  valid_T = t_T < cu_q_lens_B1[num_seqs_1[0]]
  page_index_T = jnp.clip(positions_T // page_size, 0, block_tables_BM.shape[1] - 1)
  page_T = block_tables_BM[seq_T, page_index_T]
  return jnp.where(valid_T, page_T * page_size + positions_T % page_size, 0)


def write(pool_LPG, new_T, layer, slots_T: jax.Array) -> jax.Array:
  """Writes one key (or value, or scale) per token of layer `layer` at its flat slot (page * G +
  offset) of an [L, P, G, ...] pool; `new_T` is [T, ...]."""
  G = pool_LPG.shape[2]
  new_T = new_T.astype(pool_LPG.dtype)
  if slots_T.shape[0] == 1:
    # XLA turns a one-index scatter into a dynamic-update-slice, duplicates it into each reader
    # and copies the whole pool for each copy (72 pool copies in a one-token step of `small`,
    # measured); the same slot written twice stays a scatter, updated in place.
    slots_T, new_T = jnp.concatenate([slots_T] * 2), jnp.concatenate([new_T] * 2)
  # Indexed in the pool's own shape: a reshape of it (layers folded, or slots flattened) with a
  # kv-head axis of size 1 (MQA) was laid out otherwise by XLA and the pool copied whole around it.
  return pool_LPG.at[layer, slots_T // G, slots_T % G].set(new_T, mode='promise_in_bounds')


def write_step(pages: KVPages, layer, k_TKH: jax.Array, v_TKH: jax.Array,
               slots_T: jax.Array) -> KVPages:
  """Writes layer `layer`'s keys and values of a step at their flat slots (quantizing them for
  int8 pools)."""
  if pages.k_scale_LPGK is None:
    return KVPages(write(pages.k_LPGKH, k_TKH, layer, slots_T),
                   write(pages.v_LPGKH, v_TKH, layer, slots_T))
  (kq_TKH, ks_TK), (vq_TKH, vs_TK) = quant.quantize_kv(k_TKH), quant.quantize_kv(v_TKH)
  return KVPages(*(write(pool, new, layer, slots_T) for pool, new in
                   zip(pages, (kq_TKH, vq_TKH, ks_TK, vs_TK))))


def layer_pages(pages: KVPages, layer, block_tables_BM: jax.Array, dtype):
  """(keys [*, G, K, H], values, block tables) for layer `layer`'s attention.

  Full-precision pools are passed whole as [L * P, G, K, H] (layer l's page p is page l * P + p)
  with the tables shifted to the layer's pages; int8 pools give the layer's own P pages,
  dequantized to `dtype`, and the tables as they are.
  """
  L, P = pages.k_LPGKH.shape[:2]
  if pages.k_scale_LPGK is None:
    k, v = (x.reshape(L * P, *x.shape[2:]) for x in (pages.k_LPGKH, pages.v_LPGKH))
    return k, v, block_tables_BM + layer * P

  def mine(x):
    return jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)
  k = quant.dequantize_kv(mine(pages.k_LPGKH), mine(pages.k_scale_LPGK), dtype)
  v = quant.dequantize_kv(mine(pages.v_LPGKH), mine(pages.v_scale_LPGK), dtype)
  return k, v, block_tables_BM
