"""The Mosaic TPU ragged paged attention kernel against serve/kernels/reference.py, interpreted.

Interpret mode compiles each distinct shape in seconds and runs it in a fraction of one, and the
batch's make-up (decodes, prefill chunks, kv lengths, unused slots, padding) is data, not shape: each
test compiles one shape and runs every batch below through it, and CPU compiles skip LLVM's
optimisations (without fast-math, which XLA leaves off, results are unchanged).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve.kernels import pallas_tpu, reference
from tests.serve.kernels.kernel_inputs import (B, BF16_TOL, EIGHT_DEVICES, F32_TOL, T,
                                               assert_close, batches, make_inputs)

_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def check_all_batches(N, K, H, G, dtype=jnp.float32, tol=F32_TOL, sm_scale=None, **options):
  kernel = jax.jit(functools.partial(pallas_tpu.ragged_paged_attention, sm_scale=sm_scale,
                                     **options), compiler_options=_COMPILER_OPTIONS)
  ref = jax.jit(functools.partial(reference.ragged_paged_attention, sm_scale=sm_scale),
                compiler_options=_COMPILER_OPTIONS)
  for name, seqs in batches(G).items():
    args = make_inputs(seqs, N, K, H, G, dtype)
    out = kernel(*args)
    assert out.shape == (T, N, H) and out.dtype == dtype
    want = ref(*(x.astype(jnp.float32) if x.dtype == dtype else x for x in args))
    assert_close(out, want, tol, f'{name} batch')
    used = sum(q_len for q_len, _ in seqs)
    assert not np.any(np.asarray(out[used:], np.float32)), f'{name}: padding rows are not zero'


# queries_per_block=8 puts several sequences in one query block and splits prefill chunks over
# blocks; pages_per_block=2 gives several double-buffered kv steps per sequence.
@pytest.mark.parametrize('N,K,H,G,options', [
    (2, 2, 128, 8, dict(block_sizes=pallas_tpu.BlockSizes(8, 2, kv_heads_per_block=1))),
    (4, 2, 64, 16, dict(block_sizes=pallas_tpu.BlockSizes(8, 1), sm_scale=0.3, interpret=True)),
    (4, 1, 128, 16, {}),  # MQA, 4 query heads a kv head; default block sizes
], ids=['mha-g8-heads-over-grid', 'gqa2-g16-scale', 'mqa-default'])
def test_matches_reference(N, K, H, G, options):
  check_all_batches(N, K, H, G, **options)


def test_matches_reference_bf16():
  check_all_batches(4, 2, 128, 16, jnp.bfloat16, BF16_TOL, block_sizes=pallas_tpu.BlockSizes(8, 2))


def test_block_sizes_validate_themselves():
  with pytest.raises(ValueError, match='queries_per_block=0 must be a positive int'):
    pallas_tpu.BlockSizes(queries_per_block=0)
  with pytest.raises(ValueError, match='kv_heads_per_block=2.5 must be a positive int'):
    pallas_tpu.BlockSizes(kv_heads_per_block=2.5)
  with pytest.raises(ValueError, match='kv_heads_per_block=3 must divide K=4'):
    pallas_tpu.BlockSizes(kv_heads_per_block=3).check(8, 4, 8)
  with pytest.raises(ValueError, match='pages_per_block=8 exceeds the M=4 pages'):
    pallas_tpu.BlockSizes(pages_per_block=8).check(8, 4, 4)
  with pytest.raises(ValueError, match=re.escape('queries_per_block=4 times N // K = 1')):
    pallas_tpu.BlockSizes(queries_per_block=4).check(4, 4, 8)
  assert pallas_tpu.BlockSizes.default(32, 8, 16, 256, jnp.bfloat16) == pallas_tpu.BlockSizes(
      32, 16, 8)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
def test_lowers_for_tpu(dtype):
  """Lowered for a real TPU (no interpret mode) at Llama-like heads: every op of the kernel has a
  Mosaic lowering. (Lowering only: the TPU compiler itself runs on the device.)"""
  args = make_inputs(batches(16)['mixed'], 32, 8, 128, 16, dtype, B=8, M=8)
  kernel = jax.jit(functools.partial(pallas_tpu.ragged_paged_attention, interpret=False))
  assert 'tpu_custom_call' in kernel.trace(*args).lower(lowering_platforms=('tpu',)).as_text()


@EIGHT_DEVICES
def test_heads_split_over_tensor_axis(ways=2):
  """8 query and 4 kv heads over a (data, tensor) mesh of the 8 CPU devices: same as unsplit.

  The generic Pallas interpreter runs here (the wrapper's default off TPU: see pallas_tpu)."""
  mesh = jax.make_mesh((8 // ways, ways), ('data', 'tensor'))
  args = make_inputs(batches(8)['mixed'], 8, 4, 64, 8)
  out = jax.jit(functools.partial(pallas_tpu.ragged_paged_attention_sharded, mesh,
                                  block_sizes=pallas_tpu.BlockSizes(8, 2)))(*args)
  assert out.sharding.spec == jax.sharding.PartitionSpec(None, 'tensor', None)
  assert_close(out, reference.ragged_paged_attention(*args), F32_TOL, f'tensor={ways}')


@EIGHT_DEVICES
def test_sharded_bad_mesh_raises():
  args = make_inputs(batches(8)['mixed'], 8, 4, 64, 8)
  with pytest.raises(ValueError, match="4 kv heads cannot be split 8 ways over mesh axis 'tensor'"):
    pallas_tpu.ragged_paged_attention_sharded(jax.make_mesh((8,), ('tensor',)), *args)
  with pytest.raises(ValueError, match="have no 'model' axis"):
    pallas_tpu.ragged_paged_attention_sharded(jax.make_mesh((8,), ('tensor',)), *args, axis='model')


def _bad(**changes):
  q, k, v, kv_lens, tables, cu, num_seqs = make_inputs(batches(8)['decode'], 4, 2, 128, 8)
  args = dict(q_TNH=q, k_pages_PGKH=k, v_pages_PGKH=v, kv_lens_B=kv_lens, block_tables_BM=tables,
              cu_q_lens_B1=cu, num_seqs_1=num_seqs)
  args.update(changes)
  return args


@pytest.mark.parametrize('changes,message', [
    (dict(q_TNH=jnp.zeros((T, 4 * 128))), 'q must be [T, N, H]'),
    (dict(v_pages_PGKH=jnp.zeros((25, 8, 1, 128))), 'key and value pools differ'),
    (dict(q_TNH=jnp.zeros((T, 3, 128))), 'N (3) be a multiple of K (2)'),
    (dict(cu_q_lens_B1=jnp.zeros((B,), jnp.int32)), 'cu_q_lens [B + 1]'),
    (dict(num_seqs_1=jnp.zeros((), jnp.int32)), 'num_seqs must have shape [1]'),
    (dict(q_TNH=jnp.zeros((T, 4, 96)), k_pages_PGKH=jnp.zeros((25, 8, 2, 96)),
          v_pages_PGKH=jnp.zeros((25, 8, 2, 96))), 'multiple of 64 (TPU lanes); got H=96'),
    (dict(k_pages_PGKH=jnp.zeros((25, 4, 2, 128)), v_pages_PGKH=jnp.zeros((25, 4, 2, 128))),
     'page size G that is a multiple of 8 for float32 pages'),
    (dict(q_TNH=jnp.zeros((T, 4, 128), jnp.bfloat16)), 'one dtype, float32 or bfloat16'),
    (dict(kv_lens_B=jnp.zeros((B,), jnp.float32)), 'kv_lens must be integers'),
    (dict(block_sizes=pallas_tpu.BlockSizes(pages_per_block=5)), 'exceeds the M=4 pages'),
    (dict(block_sizes=(8, 2)), 'must be a pallas_tpu.BlockSizes'),
    (dict(interpret='yes'), "interpret='yes'; use None, True, False, 'generic'"),
])
def test_bad_inputs_raise(changes, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    pallas_tpu.ragged_paged_attention(**_bad(**changes))
