"""Attention implementations against the reference `xla_attention`, forward and gradients.

Splash runs in TPU interpret mode on CPU, where compiling each distinct shape costs seconds and
running it milliseconds: shapes are tiny (batch 1-2, at most 4 heads), forward and backward share
one jit, and CPU compiles skip LLVM's optimisations (a third of the compile time; without
fast-math, which XLA leaves off, LLVM may not reorder float arithmetic, so results are unchanged).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import attention, presets, splash, transformer
from models.config import AttentionImpl
from parallelism import sharding

# Tolerances, relative to the reference's largest magnitude. float32: every output or gradient
# element is a sum of at most T=256 products, accumulated in a different order (blocks) by the
# kernel; the worst case is ~T * 2^-24 = 1.5e-5 relative, the typical one sqrt(T) * 2^-24 = 1e-6.
F32_FWD_TOL = 1e-5  # outputs are convex combinations of v: errors stay at typical size
F32_GRAD_TOL = 1e-4  # gradients chain two such sums (softmax backward, then the matmuls)
# bfloat16 (8-bit mantissa, 2^-8 = 3.9e-3): cuDNN rounds probabilities to bf16 before P @ V and
# accumulates in its own order; a few ulps of the output's scale.
BF16_TOL = 2e-2

_COMPILER_OPTIONS = ({'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu'
                     else None)


def _jit(fn):
  return jax.jit(fn, compiler_options=_COMPILER_OPTIONS)


def _segments(B, T):
  """Packed rows: documents of varied lengths, then padding (segment 0) to the end."""
  rows = [[1] * 100 + [2] * 37 + [3] * 80 + [0] * (T - 217),
          [4] * 64 + [5] * 128 + [0] * (T - 192)]
  return jnp.asarray(np.array([rows[b % 2] for b in range(B)]), jnp.int32)


def _inputs(B, T, N, K, H, dtype=jnp.float32, seed=0):
  """Standard-normal q, k, v and output cotangent (numpy: no compile per shape), segment ids."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
  return draw(B, T, N, H), draw(B, T, K, H), draw(B, T, K, H), draw(B, T, N, H), _segments(B, T)


def _forward_and_grads(fns, q, k, v, cotangent, segment_ids):
  """For each fn, (out, (dq, dk, dv)) for the loss sum(out * cotangent); all in one jit."""
  scale = q.shape[-1] ** -0.5

  @_jit
  def run(q, k, v, cotangent):
    results = []
    for fn in fns:
      out, vjp = jax.vjp(lambda q, k, v, fn=fn: fn(q, k, v, segment_ids, scale), q, k, v)
      results.append((out, vjp(cotangent)))
    return results

  return run(q, k, v, cotangent)


def _assert_close(got, want, tol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = max(1.0, float(np.max(np.abs(want))))
  err = float(np.max(np.abs(got - want)))
  assert err <= tol * scale, f'{what}: max error {err:.3g} > {tol} x {scale:.3g}'


def _assert_matches_reference(fn, q, k, v, cotangent, segment_ids):
  (out, grads), (ref_out, ref_grads) = _forward_and_grads(
      (fn, attention.xla_attention), q, k, v, cotangent, segment_ids)
  _assert_close(out, ref_out, F32_FWD_TOL, 'output')
  for name, g, ref_g in zip(('dq', 'dk', 'dv'), grads, ref_grads):
    _assert_close(g, ref_g, F32_GRAD_TOL, name)


@pytest.mark.parametrize('H', [64, 128])
@pytest.mark.parametrize('N,K', [(2, 2), (4, 2), (2, 1)], ids=['mha', 'gqa', 'mqa'])
def test_splash_matches_reference(N, K, H):
  _assert_matches_reference(splash.splash_attention, *_inputs(1, 256, N, K, H))


AUTO, EXPLICIT = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit


@pytest.mark.parametrize('mesh_shape,axis_type,K,expected', [
    # Batch over data; 4 query heads split 4 ways but 2 kv heads: each shard picks its kv head.
    ((2, 1, 4), AUTO, 2, splash._Plan(('data',), ('tensor',), kv_split=False)),
    # Batch over (data, fsdp); q and kv heads both split over tensor; explicit-sharding mode.
    ((2, 2, 2), EXPLICIT, 2, splash._Plan(('data', 'fsdp'), ('tensor',), kv_split=True)),
], ids=['kv-picked-auto', 'kv-split-explicit'])
def test_splash_under_sharded_jit(mesh_shape, axis_type, K, expected):
  """The train step's set-up: a mesh and the logical rules; the kernel runs under shard_map."""
  mesh = jax.make_mesh(mesh_shape, ('data', 'fsdp', 'tensor'), axis_types=(axis_type,) * 3)
  B = mesh_shape[0] * mesh_shape[1]
  with sharding.activation_rules(mesh):
    assert splash._plan(B, 4, K) == expected  # pylint: disable=protected-access
    _assert_matches_reference(splash.splash_attention, *_inputs(B, 256, 4, K, 64))


@pytest.mark.parametrize('shapes,message', [
    (((1, 100, 2, 64), (1, 100, 2, 64), (1, 100)), 'seq_len 100 is not a multiple of 128'),
    (((1, 256, 3, 64), (1, 256, 2, 64), (1, 256)), 'not a multiple of 2 key/value heads'),
    (((1, 256, 2, 64), (1, 128, 2, 64), (1, 256)), 'is self-attention'),
    (((1, 256, 2, 64), (1, 256, 2, 32), (1, 256)), 'is self-attention'),
    (((1, 256, 2, 64), (1, 256, 2, 64), (1, 128)), 'segment ids must be integers of shape'),
    (((256, 2, 64), (256, 2, 64), (256,)), 'wants q [B, T, N, H]'),
])
def test_splash_bad_shapes_raise(shapes, message):
  q_shape, kv_shape, seg_shape = shapes
  q, kv = np.zeros(q_shape, np.float32), np.zeros(kv_shape, np.float32)
  with pytest.raises(ValueError, match=re.escape(message)):
    splash.splash_attention(q, kv, kv, np.ones(seg_shape, np.int32), 0.125)


def test_splash_seq_len_error_names_the_fix():
  q = np.zeros((1, 100, 2, 64), np.float32)
  with pytest.raises(ValueError, match="pad sequences to a multiple of 128 or use attention='xla'"):
    attention.attend(attention.AttentionImpl.SPLASH, q, q, q, np.ones((1, 100), np.int32))


def test_block_sizes_validate_themselves():
  with pytest.raises(ValueError, match=r'block_q=100 must be a positive multiple of 128'):
    splash.BlockSizes(block_q=100)
  with pytest.raises(ValueError, match='block_kv=256 must be a multiple of block_kv_compute=512'):
    splash.BlockSizes(block_kv=256, block_kv_compute=512)
  with pytest.raises(ValueError, match='seq_len 256 is not a multiple of block_q=512'):
    splash.BlockSizes().check(256)
  assert splash.BlockSizes.for_seq_len(768) == splash.BlockSizes(256, 256)
  assert splash.BlockSizes.for_seq_len(2048).block_kv_bwd == 512


def test_transformer_splash_matches_xla():
  """One-layer model: same weights, attention='splash' vs 'xla', packed rows."""
  cfg = presets.preset('tiny', num_layers=1, head_dim=64, attention='xla')
  create = lambda cfg: transformer.Transformer(cfg, nnx.Rngs(0))  # noqa: E731
  # Initialised in one jit: eager init compiles every parameter shape's initializer separately.
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: create(cfg)))
  model_xla = nnx.merge(graphdef, _jit(lambda: nnx.state(create(cfg)))())
  model_splash = nnx.eval_shape(lambda: create(dataclasses.replace(cfg, attention='splash')))
  nnx.update(model_splash, nnx.state(model_xla))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 256)), jnp.int32)
  segment_ids = _segments(2, 256)
  positions = jnp.broadcast_to(jnp.arange(256), (2, 256))

  def logits(model):
    graphdef, state = nnx.split(model)
    return _jit(lambda state: nnx.merge(graphdef, state)(tokens, positions, segment_ids))(state)

  # Attention's ~1e-5 relative error passes through two more float32 matmuls (o-proj, LM head).
  _assert_close(logits(model_splash), logits(model_xla), F32_GRAD_TOL, 'logits')


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
@pytest.mark.parametrize('N,K,H', [(4, 4, 64), (8, 2, 128)], ids=['mha', 'gqa'])
def test_cudnn_matches_reference_bf16(N, K, H):
  """cuDNN in bf16 against the reference in float32 on the same bf16-rounded inputs."""
  q, k, v, cotangent, segment_ids = _inputs(2, 256, N, K, H, jnp.bfloat16)
  [(out, grads)] = _forward_and_grads([attention.cudnn_attention], q, k, v, cotangent, segment_ids)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, cotangent)]
  [(ref_out, ref_grads)] = _forward_and_grads([attention.xla_attention], *f32, segment_ids)
  assert out.dtype == jnp.bfloat16
  _assert_close(out, ref_out, BF16_TOL, 'output')
  for name, g, ref_g in zip(('dq', 'dk', 'dv'), grads, ref_grads):
    _assert_close(g, ref_g, BF16_TOL, name)


@pytest.mark.parametrize('platform,dtype,seq_len,expected', [
    ('cpu', jnp.float32, 256, AttentionImpl.XLA),
    ('cpu', jnp.bfloat16, 256, AttentionImpl.XLA),
    ('gpu', jnp.bfloat16, 100, AttentionImpl.CUDNN),
    ('gpu', jnp.float32, 256, AttentionImpl.XLA),  # cuDNN needs 16-bit inputs
    ('tpu', jnp.bfloat16, 256, AttentionImpl.SPLASH),
    ('tpu', jnp.bfloat16, 100, AttentionImpl.XLA),  # splash needs T % 128 == 0
])
def test_auto_picks_the_fastest_that_applies(platform, dtype, seq_len, expected):
  assert attention.resolve(AttentionImpl.AUTO, platform, dtype, seq_len) == expected
  assert attention.resolve(AttentionImpl.XLA, platform, dtype, seq_len) == AttentionImpl.XLA
