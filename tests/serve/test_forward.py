"""The paged forward pass against the model run densely on whole sequences (same params)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import presets, transformer
from serve import forward, kv_cache

ATOL = 1e-4  # float32 logits after 2 layers; the paged and dense paths differ only in summation order.
G = 4  # page size
P = 24  # pages in the pool, null page included
M = 6  # pages per sequence
B = 4  # sequence rows per step


def tiny_config(**overrides):
  fields = dict(num_layers=2, d_model=64, vocab_size=256, num_heads=8, num_kv_heads=4,
                head_dim=16, mlp_dim=128, dtype='float32')
  fields.update(overrides)
  return presets.preset('tiny', **fields)


def random_params(cfg, seed=0):
  """Random weights drawn on the host (no per-shape compiles of jax.random initialisers).

  Matrices get std 1/sqrt(fan in), as the model's own init; norm scales and biases are
  perturbed away from 1 and 0 so that a missed term would show."""
  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  fan_in = {'o_NHD': cfg.num_heads * cfg.head_dim, 'down_FD': cfg.mlp_dim}

  def draw(path, x):
    name = [getattr(k, 'key', None) for k in path if isinstance(getattr(k, 'key', None), str)][-1]
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if name == 'scale':
      return jnp.asarray(1 + 0.1 * noise)
    if name.endswith(('_NH', '_KH')):  # biases
      return jnp.asarray(0.1 * noise)
    return jnp.asarray(noise / np.sqrt(fan_in.get(name, cfg.d_model)))

  return graphdef, jax.tree.map_with_path(draw, state)


@functools.cache
def model_and_step(scan_layers: bool, qkv_bias: bool = False, qk_norm: bool = False):
  cfg = tiny_config(scan_layers=scan_layers, qkv_bias=qkv_bias, qk_norm=qk_norm)
  graphdef, params = random_params(cfg)
  dense = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))
  step = jax.jit(functools.partial(forward.forward, graphdef), donate_argnums=(1,))
  return cfg, functools.partial(dense, params), params, step


def make_batch(chunks, T):
  """chunks: (token_ids, start_pos, pages) per sequence -> StepBatch padded to T tokens."""
  tokens, positions = np.zeros(T, np.int32), np.zeros(T, np.int32)
  tables, kv_lens = np.zeros((B, M), np.int32), np.zeros(B, np.int32)
  cu, last = np.zeros(B + 1, np.int32), np.zeros(B, np.int32)
  t = 0
  for b, (ids, start, pages) in enumerate(chunks):
    n = len(ids)
    tokens[t:t + n], positions[t:t + n] = ids, np.arange(start, start + n)
    tables[b, :len(pages)] = pages
    kv_lens[b], last[b] = start + n, t + n - 1
    t += n
    cu[b + 1] = t
  cu[len(chunks) + 1:] = t
  return forward.StepBatch(tokens, positions, tables, kv_lens, cu,
                           np.array([len(chunks)], np.int32), last)


def dense_logits(model, ids, length=16):
  """Logits of the model run on the whole sequence, right-padded to one compiled length."""
  padded = np.zeros((1, length), np.int32)
  padded[0, :len(ids)] = ids
  return np.asarray(model(padded))[0, :len(ids)]


def garbage_pages(cfg):
  spec = kv_cache.KVCacheSpec.for_model(cfg, P, G)
  k = jax.random.normal(jax.random.key(7), spec.shape) * 3
  v = jax.random.normal(jax.random.key(8), spec.shape) * 3
  return kv_cache.KVPages(k, v)


# Three sequences run as prefill chunks, then decodes, on non-contiguous pages: each step lists
# (sequence, chunk start, chunk end).
LENGTHS = (9, 15, 4)
PAGES = ((5, 2, 9), (1, 7, 3, 11), (20,))
STEPS = (((0, 0, 3), (1, 0, 8)),
         ((0, 3, 9), (1, 8, 13), (2, 0, 3)),
         ((1, 13, 14), (2, 3, 4)),
         ((1, 14, 15),))


@pytest.mark.parametrize('scan_layers,qkv_bias,qk_norm', [
    (True, False, False), (False, False, False), (True, True, True)])
def test_chunked_steps_match_dense_logits(scan_layers, qkv_bias, qk_norm):
  cfg, model, params, step = model_and_step(scan_layers, qkv_bias, qk_norm)
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in LENGTHS]
  expected = [dense_logits(model, s) for s in seqs]
  pages = garbage_pages(cfg)  # stale keys/values everywhere: length masking must hide them
  for plan in STEPS:
    chunks = [(seqs[i][a:e], a, PAGES[i]) for i, a, e in plan]
    batch = make_batch(chunks, T=16)
    logits_BV, pages = step(params, pages, batch)
    for b, (i, a, e) in enumerate(plan):
      np.testing.assert_allclose(np.asarray(logits_BV[b]), expected[i][e - 1], atol=ATOL, rtol=0)


def test_writes_touch_only_the_sequences_slots_and_the_null_page():
  cfg, model, params, step = model_and_step(True)
  seq = np.arange(7, dtype=np.int32) + 3
  before = garbage_pages(cfg)
  k_before = np.asarray(before.k_LPGKH)
  _, after = step(params, before, make_batch([(seq, 0, (4, 2))], T=16))  # 9 padding tokens
  changed = np.any(np.asarray(after.k_LPGKH) != k_before, axis=(3, 4))  # [L, P, G]
  expected = np.zeros_like(changed)
  for pos in range(len(seq)):
    expected[:, (4, 2)[pos // G], pos % G] = True
  expected[:, 0] = changed[:, 0]  # padding lands somewhere in the null page
  np.testing.assert_array_equal(changed, expected)
  assert changed[:, 0].any(), 'padding tokens should write into the null page'


def test_unwritten_pool_is_not_read():
  """Same step on zeroed and on garbage pools: identical logits (isolation by length masking)."""
  cfg, model, params, step = model_and_step(True)
  seq = np.arange(6, dtype=np.int32)
  batch = make_batch([(seq, 0, (3, 8))], T=8)
  spec = kv_cache.KVCacheSpec.for_model(cfg, P, G)
  got_zero, _ = step(params, kv_cache.init_pages(spec), batch)
  got_garbage, _ = step(params, garbage_pages(cfg), batch)
  np.testing.assert_array_equal(np.asarray(got_zero[0]), np.asarray(got_garbage[0]))
