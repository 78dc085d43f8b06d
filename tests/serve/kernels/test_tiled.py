"""The tiled pure-JAX paged attention (the CPU engine's path) against serve/kernels/reference.py.

The named batches run at the shared T = 24 (one-token tiles) and at T = 64 and 256, where tiles of
4 and 16 tokens split prefill chunks and leave partial last tiles; a wide block table (64 pages)
with short contexts checks that blocks past the longest live sequence are never needed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve.kernels import reference, tiled
from tests.serve.kernels.kernel_inputs import F32_TOL, assert_close, batches, make_inputs


def check(seqs, N, K, H, G, T, M, sm_scale=None, B=6):
  args = make_inputs(seqs, N, K, H, G, T=T, B=B, M=M)
  out = tiled.ragged_paged_attention(*args, sm_scale=sm_scale)
  want = jax.jit(functools.partial(reference.ragged_paged_attention, sm_scale=sm_scale))(*args)
  assert out.shape == (T, N, H) and out.dtype == jnp.float32
  assert_close(out, want, F32_TOL, f'T={T} M={M} {seqs}')
  used = sum(q_len for q_len, _ in seqs)
  assert not np.any(np.asarray(out[used:])), 'padding rows are not zero'


@pytest.mark.parametrize('N,K,H,G', [(4, 2, 16, 4), (8, 8, 8, 16), (6, 1, 32, 8)],
                         ids=['gqa-g4', 'mha-g16', 'mqa-g8'])
@pytest.mark.parametrize('T', [24, 64])
def test_named_batches_match_reference(N, K, H, G, T):
  for seqs in batches(G).values():
    check(seqs, N, K, H, G, T=T, M=4, sm_scale=0.3 if K == 1 else None)


def test_long_prefill_chunks_and_partial_tiles():
  """T = 256 (16-token tiles): chunks of 100, 37 and 1 tokens behind long contexts, and decodes."""
  seqs = [(100, 180), (1, 300), (37, 37), (1, 1), (117, 250)]
  check(seqs, 4, 2, 16, 16, T=256, M=20)


@pytest.mark.parametrize('longest', [40, 100, 250, 1000])
def test_wide_block_table_with_short_contexts(longest):
  """A 64-page table whose longest sequence fills 3, 7, 16 or 63 pages: each picks another width
  (4, 8, 16, 64 pages), and every result equals the reference over all 64 pages."""
  check([(1, 5), (1, longest), (3, 12)], 4, 2, 16, 16, T=16, M=64)


def test_table_width_changes_nothing():
  """Table entries past the longest live sequence's blocks are never visited: padding a 4-page
  table to 64 pages of out-of-range ids gives bit-identical outputs."""
  short = make_inputs([(1, 40), (1, 7)], 4, 2, 16, 16, T=16, B=2, M=4)
  wide = list(short)
  wide[4] = jnp.pad(short[4], ((0, 0), (0, 60)), constant_values=10 ** 6)
  assert_close(tiled.ragged_paged_attention(*wide), tiled.ragged_paged_attention(*short), 0,
               'wide vs narrow table')


@pytest.mark.parametrize('T,seq', [(4, (4, 150)), (8, (5, 37)), (16, (16, 16)), (64, (50, 250))],
                         ids=['verify-4', 'verify-5-of-8', 'prefill-16', 'chunk-50-of-64'])
def test_one_sequence_runs_as_one_tile(T, seq):
  """A step holding one sequence (batch 1: a verification, a prefill chunk) takes the one-tile
  branch; it matches the reference, and a second sequence (the general tiles) still does."""
  assert tiled.tiles(T, 6, 1) == (T, 1) and tiled.tiles(T, 6) != (T, 1)
  check([seq], 4, 2, 16, 16, T=T, M=16)
  check([(seq[0] - 1, seq[1]), (1, 20)], 4, 2, 16, 16, T=T, M=16)
