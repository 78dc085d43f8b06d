"""Which ragged paged attention kernel the engine runs, behind one enum.

Every backend meets the contract in serve/kernels/reference.py: (q_TNH, k_pages_PGKH, v_pages_PGKH,
kv_lens_B, block_tables_BM, cu_q_lens_B1, num_seqs_1, *, sm_scale) -> [T, N, H]. The Pallas kernel
modules are imported only when chosen, so a CPU build never needs their dependencies.
"""

from __future__ import annotations

import enum
import importlib
from typing import Callable

import jax
from jax.sharding import Mesh

_MODULES = {
    'reference': 'serve.kernels.reference',
    'tiled': 'serve.kernels.tiled',
    'pallas_tpu': 'serve.kernels.pallas_tpu',
    'pallas_gpu': 'serve.kernels.pallas_gpu',
}


class AttentionBackend(str, enum.Enum):
  """The kernel the engine runs. AUTO: Pallas on TPU and GPU, the tiled pure-JAX path elsewhere.
  REFERENCE is the naive definition (every query token gathers its whole block table): tests."""

  AUTO = 'auto'
  REFERENCE = 'reference'
  TILED = 'tiled'
  PALLAS_TPU = 'pallas_tpu'
  PALLAS_GPU = 'pallas_gpu'


def resolve(backend: AttentionBackend | str, platform: str | None = None) -> AttentionBackend:
  """AUTO -> the backend for `platform` (default: jax.default_backend()); others pass through."""
  try:
    backend = AttentionBackend(backend)
  except ValueError:
    raise ValueError(f'Unknown attention backend {backend!r}; choose one of '
                     f'{[b.value for b in AttentionBackend]}.') from None
  if backend is not AttentionBackend.AUTO:
    return backend
  platform = platform or jax.default_backend()
  return {'tpu': AttentionBackend.PALLAS_TPU,
          'gpu': AttentionBackend.PALLAS_GPU}.get(platform, AttentionBackend.TILED)


def _module(backend: AttentionBackend):
  name = _MODULES[backend.value]
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ImportError(f'Attention backend {backend.value!r} needs module {name}, which failed to '
                      f'import ({e}); use AttentionBackend.REFERENCE instead.') from e


def kernel(backend: AttentionBackend | str) -> Callable[..., jax.Array]:
  """The `ragged_paged_attention` function of `backend` (AUTO resolved for this platform)."""
  return _module(resolve(backend)).ragged_paged_attention


def ragged_paged_attention(backend: AttentionBackend | str, q_TNH, k_pages_PGKH, v_pages_PGKH,
                           kv_lens_B, block_tables_BM, cu_q_lens_B1, num_seqs_1, *,
                           sm_scale: float | None = None, mesh: Mesh | None = None,
                           **options) -> jax.Array:
  """Runs `backend`'s kernel; `options` go to that kernel only (block sizes, interpret mode).

  With a mesh whose 'tensor' axis is > 1, a Pallas kernel runs under its own shard_map (heads split
  over 'tensor'); the reference and tiled paths are plain JAX and are left to XLA's partitioner.
  """
  backend = resolve(backend)
  module = _module(backend)
  args = (q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_B, block_tables_BM, cu_q_lens_B1, num_seqs_1)
  if (mesh is not None and mesh.shape.get('tensor', 1) > 1
      and backend not in (AttentionBackend.REFERENCE, AttentionBackend.TILED)):
    return module.ragged_paged_attention_sharded(mesh, *args, axis='tensor', sm_scale=sm_scale,
                                                 **options)
  return module.ragged_paged_attention(*args, sm_scale=sm_scale, **options)
