"""The Triton ragged paged attention kernel against serve/kernels/reference.py.

On CPU the kernel runs in Pallas interpret mode; on a GPU every test runs the real kernel (the
reference then computes in full float32: `jax.default_matmul_precision('highest')`), and the tests
marked gpu add larger batches. Interpret mode compiles each distinct shape in seconds and runs it
in a fraction of one, and the batch's make-up (decodes, prefill chunks, kv lengths, unused slots,
padding) is data, not shape: each test compiles one shape and runs every batch below through it,
and CPU compiles skip LLVM's optimisations (without fast-math, which XLA leaves off, results are
unchanged).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve.kernels import pallas_gpu, reference
from tests.serve.kernels.kernel_inputs import (B, BF16_TOL, EIGHT_DEVICES, F32_TOL, T,
                                               assert_close, batches, make_inputs)

ON_GPU = jax.default_backend() == 'gpu'

_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0} if not ON_GPU else None


def reference_f32(args, sm_scale=None):
  """The reference in float32 (inputs upcast, full-precision matmuls on GPU as well)."""
  args = [x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in args]
  with jax.default_matmul_precision('highest'):
    return jax.jit(functools.partial(reference.ragged_paged_attention, sm_scale=sm_scale),
                   compiler_options=_COMPILER_OPTIONS)(*args)


def check_all_batches(N, K, H, G, dtype=jnp.float32, tol=F32_TOL, sm_scale=None, **options):
  kernel = jax.jit(functools.partial(pallas_gpu.ragged_paged_attention, sm_scale=sm_scale,
                                     **options), compiler_options=_COMPILER_OPTIONS)
  for name, seqs in batches(G).items():
    args = make_inputs(seqs, N, K, H, G, dtype)
    out = kernel(*args)
    assert out.shape == (T, N, H) and out.dtype == dtype
    want = reference_f32(args, sm_scale)
    assert_close(out, want, tol, f'{name} batch')
    used = sum(q_len for q_len, _ in seqs)
    assert not np.any(np.asarray(out[used:], np.float32)), f'{name}: padding rows are not zero'


# Items of 16 // (N // K) tokens split the 9- and 10-token prefill chunks when N > K; 16 kv tokens
# per step give several steps per sequence.
@pytest.mark.parametrize('N,K,H,G,options', [
    (2, 2, 128, 8, dict(block_sizes=pallas_gpu.BlockSizes(16, 2))),
    (4, 2, 64, 16, dict(block_sizes=pallas_gpu.BlockSizes(8, 1), sm_scale=0.3)),
    (6, 2, 64, 8, dict(block_sizes=pallas_gpu.BlockSizes(4, 2))),  # 3 heads a group, padded to 4
    (4, 1, 128, 16, {}),  # MQA, 4 query heads a kv head; default block sizes
], ids=['mha-g8', 'gqa2-g16-scale', 'gqa3-padded', 'mqa-default'])
def test_matches_reference(N, K, H, G, options):
  check_all_batches(N, K, H, G, **options)


def test_matches_reference_bf16():
  check_all_batches(4, 2, 128, 16, jnp.bfloat16, BF16_TOL, block_sizes=pallas_gpu.BlockSizes(8, 1))


def test_block_sizes_validate_themselves():
  with pytest.raises(ValueError, match='queries_per_block=0 must be a positive int'):
    pallas_gpu.BlockSizes(queries_per_block=0)
  with pytest.raises(ValueError, match='num_warps=2.5 must be a positive int'):
    pallas_gpu.BlockSizes(num_warps=2.5)
  with pytest.raises(ValueError, match='queries_per_block=12 must be a power of two'):
    pallas_gpu.BlockSizes(queries_per_block=12)
  with pytest.raises(ValueError, match='queries_per_block=4 gives 8 rows'):
    pallas_gpu.BlockSizes(queries_per_block=4).check(4, 2, 16)
  with pytest.raises(ValueError, match='pages_per_block=3 times page size G=8 = 24 kv tokens'):
    pallas_gpu.BlockSizes(pages_per_block=3).check(4, 2, 8)
  assert pallas_gpu.BlockSizes.default(32, 8, 16, 256) == pallas_gpu.BlockSizes(8, 4)
  assert pallas_gpu.BlockSizes.default(4, 4, 4, 2) == pallas_gpu.BlockSizes(32, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='needs a GPU')
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)],
                         ids=['f32', 'bf16'])
def test_real_gpu_larger_batch(dtype, tol):
  """Llama-like heads (N=32, K=8, H=128, G=16): 24 decodes up to 1000 tokens and 3 prefill chunks."""
  rng = np.random.default_rng(1)
  seqs = [(1, int(n)) for n in rng.integers(1, 1000, 24)] + [(160, 700), (200, 200), (120, 1024)]
  args = make_inputs(seqs, 32, 8, 128, 16, dtype, T=512, B=32, M=64)
  out = pallas_gpu.ragged_paged_attention(*args)
  assert_close(out, reference_f32(args), tol, 'large batch')
  assert not np.any(np.asarray(out[sum(q for q, _ in seqs):], np.float32))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
def test_lowers_for_gpu(dtype):
  """Lowered for a real GPU (no interpret mode) at Llama-like heads: every op of the kernel has a
  Triton lowering. (Lowering only: the GPU compiler itself runs on the device.)"""
  args = make_inputs(batches(16)['mixed'], 32, 8, 128, 16, dtype, B=8, M=8)
  kernel = jax.jit(functools.partial(pallas_gpu.ragged_paged_attention, interpret=False))
  assert '__gpu$xla.gpu.triton' in kernel.trace(*args).lower(lowering_platforms=('cuda',)).as_text()


@EIGHT_DEVICES
@pytest.mark.parametrize('ways', [2, 4])
def test_heads_split_over_tensor_axis(ways):
  """8 query and 4 kv heads over a (data, tensor) mesh of the 8 CPU devices: same as unsplit."""
  mesh = jax.make_mesh((8 // ways, ways), ('data', 'tensor'))
  args = make_inputs(batches(8)['mixed'], 8, 4, 64, 8)
  out = jax.jit(functools.partial(pallas_gpu.ragged_paged_attention_sharded, mesh,
                                  block_sizes=pallas_gpu.BlockSizes(8, 2)))(*args)
  assert out.sharding.spec == jax.sharding.PartitionSpec(None, 'tensor', None)
  assert_close(out, reference.ragged_paged_attention(*args), F32_TOL, f'tensor={ways}')


@EIGHT_DEVICES
def test_sharded_bad_mesh_raises():
  args = make_inputs(batches(8)['mixed'], 8, 4, 64, 8)
  with pytest.raises(ValueError, match="4 kv heads cannot be split 8 ways over mesh axis 'tensor'"):
    pallas_gpu.ragged_paged_attention_sharded(jax.make_mesh((8,), ('tensor',)), *args)
  with pytest.raises(ValueError, match="have no 'model' axis"):
    pallas_gpu.ragged_paged_attention_sharded(jax.make_mesh((8,), ('tensor',)), *args, axis='model')


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
          v_pages_PGKH=jnp.zeros((25, 8, 2, 96))), 'power of two >= 16 (Triton block shapes)'),
    (dict(q_TNH=jnp.zeros((T, 4, 128), jnp.bfloat16)), 'one dtype; got q bfloat16'),
    (dict(kv_lens_B=jnp.zeros((B,), jnp.float32)), 'kv_lens must be integers'),
    (dict(block_sizes=pallas_gpu.BlockSizes(queries_per_block=2)), 'gives 4 rows'),
    (dict(block_sizes=(8, 2)), 'must be a pallas_gpu.BlockSizes'),
])
def test_bad_inputs_raise(changes, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    pallas_gpu.ragged_paged_attention(**_bad(**changes))
