"""Paged key/value pools on device, and the write of a step's new keys/values into their pages.

The pools hold every layer: keys and values are [L, P, G, K, H]. Page 0 of each layer is the null
page: block-table entries past a sequence's last page point at it, and padding tokens write there;
attention masks every position at or past a sequence's length, so it is never read.

Inside the forward pass the layer axis is folded into the page axis ([L * P, G, K, H], a free
reshape): layer l's page p is page l * P + p. One pool then serves every layer with the kernels'
[P, G, K, H] contract, and is updated in place in the layer loop's carry (no per-layer copies).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from models.config import ModelConfig
from parallelism.rules import DEFAULT_RULES, Rules, logical_to_spec

# Logical names of the pool axes: kv heads follow the model's 'kv_heads' rule (tensor parallel).
POOL_AXES = ('layers', None, None, 'kv_heads', 'head_dim')


class KVPages(NamedTuple):
  """Key and value pools, [L, P, G, K, H] each (a pytree; donated to every step)."""

  k_LPGKH: jax.Array
  v_LPGKH: jax.Array


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
  """The shape and dtype of the pools."""

  num_layers: int  # L
  num_pages: int  # P, the null page 0 included
  page_size: int  # G
  num_kv_heads: int  # K
  head_dim: int  # H
  dtype: str = 'float32'

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
  def bytes_per_token(self) -> int:
    """Keys + values of one token over all layers."""
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize

  @property
  def bytes(self) -> int:
    return self.bytes_per_token * self.num_pages * self.page_size


def pool_sharding(spec: KVCacheSpec, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Pools split over kv heads by the 'kv_heads' rule (replicated if K does not divide)."""
  return NamedSharding(mesh, logical_to_spec(POOL_AXES, spec.shape, mesh, rules))


def init_pages(spec: KVCacheSpec, sharding: NamedSharding | None = None) -> KVPages:
  """Zeroed pools, created directly in their sharding (never whole on one device)."""
  def create():
    zeros = jnp.zeros(spec.shape, spec.dtype)
    return KVPages(zeros, zeros)
  out_shardings = None if sharding is None else KVPages(sharding, sharding)
  return jax.jit(create, out_shardings=out_shardings)()


def slot_mapping(positions_T, block_tables_BM, cu_q_lens_B1, num_seqs_1, page_size: int):
  """Flat cache slot (page * G + offset) of each token; padding tokens get slot 0 (null page).

  Token t belongs to sequence b with cu_q_lens[b] <= t < cu_q_lens[b + 1]; its position picks
  the page (position // G, looked up in b's block table) and the offset in it.
  """
  T = positions_T.shape[0]
  t_T = jnp.arange(T, dtype=jnp.int32)
  seq_T = jnp.searchsorted(cu_q_lens_B1, t_T, side='right').astype(jnp.int32) - 1
  seq_T = jnp.clip(seq_T, 0, block_tables_BM.shape[0] - 1)
  valid_T = t_T < cu_q_lens_B1[num_seqs_1[0]]
  page_index_T = jnp.clip(positions_T // page_size, 0, block_tables_BM.shape[1] - 1)
  page_T = block_tables_BM[seq_T, page_index_T]
  return jnp.where(valid_T, page_T * page_size + positions_T % page_size, 0)


def write(pages_XGKH: jax.Array, new_TKH: jax.Array, slots_T: jax.Array) -> jax.Array:
  """Writes one key (or value) per token at its flat slot of a [X, G, K, H] pool."""
  X, G, K, H = pages_XGKH.shape
  flat_SKH = pages_XGKH.reshape(X * G, K, H)
  flat_SKH = flat_SKH.at[slots_T].set(new_TKH.astype(flat_SKH.dtype), mode='promise_in_bounds')
  return flat_SKH.reshape(X, G, K, H)
