"""Structured pruning: exact where it can be, ranked by importance that is real, sized for the mesh.

Exactness is checked against the original model with the removed units zeroed (or the removed blocks
made the identity), which computes the same function through the original shapes; embedding-channel
pruning (not exact: RMSNorm averages over fewer channels) against `transformers` after an export.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import hf_files, transformer
from models.config import ModelConfig
from train import prune

ATOL = 1e-5  # float32 logits of magnitude ~1 after three layers (DESIGN.md, tolerances)
CFG = ModelConfig(vocab_size=96, d_model=32, num_layers=3, num_heads=6, num_kv_heads=3,
                  head_dim=8, mlp_dim=256)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
  model = transformer.Transformer(cfg, nnx.Rngs(seed))
  return prune.stack_layers(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))))


def random_batch(vocab: int, seed: int = 0, batch: int = 2, length: int = 16) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  return {'inputs': tokens, 'targets': np.roll(tokens, -1, 1),
          'loss_mask': (rng.random((batch, length)) > 0.2).astype(np.float32),
          'positions': np.broadcast_to(np.arange(length), (batch, length)).astype(np.int32),
          'segment_ids': np.ones((batch, length), np.int32)}


def logits(cfg: ModelConfig, params: dict, tokens) -> np.ndarray:
  model = prune._model(cfg, params)  # pylint: disable=protected-access
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))


def test_sizes_round_to_the_mesh_and_the_kernels():
  cfg = ModelConfig(vocab_size=96, d_model=64, num_layers=4, num_heads=8, num_kv_heads=4,
                    head_dim=8, mlp_dim=768)
  sizes = prune.choose_sizes(cfg, prune.KeepFractions(0.4, 0.5, 0.75, 0.5), {'tensor': 2, 'fsdp': 4})
  assert sizes == dict(num_layers=3, num_kv_heads=2, num_heads=4, mlp_dim=256, d_model=32)
  assert sizes['mlp_dim'] % 128 == 0 and sizes['num_heads'] % sizes['num_kv_heads'] == 0
  # An MLP width that was not a multiple of 128 keeps only the tensor axis as its unit.
  odd = dataclasses.replace(cfg, mlp_dim=100)
  assert prune.choose_sizes(odd, prune.KeepFractions(0.5, 1, 1, 1), {})['mlp_dim'] == 50
  with pytest.raises(ValueError, match=r'--heads-keep 0.2 keeps 0.80 of 4 key/value-head groups.*'
                                       r'multiple of 2: use --heads-keep >= 0.5'):
    prune.choose_sizes(cfg, prune.KeepFractions(1, 0.2, 1, 1), {'tensor': 2})
  with pytest.raises(ValueError, match=r'--mlp-keep 1.5: a keep fraction must be in \(0, 1\]'):
    prune.KeepFractions(mlp_keep=1.5)


@pytest.mark.parametrize('kind', ['mlp', 'groups', 'layers', 'all', 'all_qkv_bias_unrolled'])
def test_pruning_units_equals_zeroing_them(kind):
  cfg = CFG
  if kind == 'all_qkv_bias_unrolled':
    cfg = dataclasses.replace(CFG, qkv_bias=True, scan_layers=False)
  fractions = dict(mlp=(0.5, 1, 1, 1), groups=(1, 0.67, 1, 1), layers=(1, 1, 0.67, 1))
  params = random_params(cfg)
  if cfg.qkv_bias:  # zero-initialised biases would not tell kept from removed heads
    params['layers']['attn']['bias'] = jax.tree.map(
        lambda b: np.random.default_rng(1).normal(0, 0.5, b.shape).astype(np.float32),
        params['layers']['attn']['bias'])
  stats = prune.activation_stats(cfg, params, [random_batch(cfg.vocab_size, s) for s in range(2)])
  sizes = prune.choose_sizes(cfg, prune.KeepFractions(*fractions.get(kind, (0.5, 0.67, 0.67, 1))), {})
  keep = prune.select(stats, sizes)
  small = prune.pruned_config(cfg, keep)
  assert (small.num_layers, small.num_kv_heads, small.mlp_dim) == (
      sizes['num_layers'], sizes['num_kv_heads'], sizes['mlp_dim'])
  tokens = random_batch(cfg.vocab_size, seed=7)['inputs']
  got = logits(small, prune.slice_params(cfg, params, keep), tokens)
  want = logits(cfg, prune.zeroed_params(cfg, params, keep), tokens)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # Something was removed, and it mattered.
  assert small.num_params() < cfg.num_params()
  assert np.max(np.abs(logits(cfg, params, tokens) - want)) > 100 * ATOL


def test_importance_statistics_match_a_direct_computation():
  """Layer 0's scores from hand-written numpy (float64) over the same batch."""
  cfg = dataclasses.replace(CFG, num_layers=1)
  params = random_params(cfg)
  batch = random_batch(cfg.vocab_size)
  stats = prune.activation_stats(cfg, params, [batch])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  w = batch['loss_mask'].astype(np.float64)

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_eps) * scale

  x = p['embed_VD'][batch['inputs']]
  layer = jax.tree.map(lambda a: a[0], p['layers'])
  a = rms(x, layer['attn_norm']['scale'])
  # Embedding channels: |attn_norm(x)| + |mlp_norm(h)| + |final_norm(y)|; check the first term's
  # share through a model whose other norms are zeroed.
  zeroed = jax.tree.map(np.copy, params)
  zeroed['layers']['mlp_norm']['scale'][:] = 0
  zeroed['final_norm']['scale'][:] = 0
  only_attn_norm = prune.activation_stats(cfg, zeroed, [batch])['channels']
  np.testing.assert_allclose(only_attn_norm, np.einsum('btd,bt->d', np.abs(a), w) / w.sum(),
                             rtol=1e-5)
  m = rms(x + _attention_out(cfg, layer, a), layer['mlp_norm']['scale'])
  mlp = layer['mlp']
  gate, up = m @ mlp['gate_DF'], m @ mlp['up_DF']
  hidden = gate / (1 + np.exp(-gate)) * up
  np.testing.assert_allclose(stats['neurons'][0], np.einsum('btf,bt->f', np.abs(hidden), w) / w.sum(),
                             rtol=1e-4)
  y = x + _attention_out(cfg, layer, a) + hidden @ mlp['down_FD']
  cos = np.sum(x * y, -1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
  np.testing.assert_allclose(stats['blocks'][0], np.sum((1 - cos) * w) / w.sum(), rtol=1e-4)


def _attention_out(cfg, layer, a):
  """Causal GQA attention of one layer in float64 numpy (RoPE in the rotate-half layout)."""
  att = layer['attn']
  q = np.einsum('btd,dnh->btnh', a, att['q_DNH'])
  k = np.einsum('btd,dkh->btkh', a, att['k_DKH'])
  v = np.einsum('btd,dkh->btkh', a, att['v_DKH'])
  H, T = cfg.head_dim, a.shape[1]
  inv = 1.0 / cfg.rope_theta ** (np.arange(0, H, 2) / H)
  ang = np.arange(T)[:, None] * inv[None]
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]

  def rope(x):
    x1, x2 = x[..., :H // 2], x[..., H // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  q, k = rope(q), rope(k)
  R = cfg.num_heads // cfg.num_kv_heads
  k, v = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)
  s = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(H)
  s = np.where(np.tril(np.ones((T, T), bool))[None, None], s, -np.inf)
  probs = np.exp(s - s.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bnts,bsnh,nhd->btd', probs, v, att['o_NHD'])


def test_embedding_channels_export_to_transformers_and_reload(tmp_path):
  import torch
  import transformers
  cfg = dataclasses.replace(CFG, tie_embeddings=False)
  params = random_params(cfg)
  stats = prune.activation_stats(cfg, params, [random_batch(cfg.vocab_size)])
  keep = prune.select(stats, prune.choose_sizes(cfg, prune.KeepFractions(0.5, 0.67, 1, 0.5), {}))
  small = prune.pruned_config(cfg, keep)
  assert small.d_model == 16 and small.num_heads == 4 and small.mlp_dim == 128
  small_params = prune.slice_params(cfg, params, keep)
  assert small_params['embed_VD'].shape == (96, 16)
  assert small_params['layers']['attn']['q_DNH'].shape == (3, 16, 4, 8)
  assert small_params['layers']['attn']['o_NHD'].shape == (3, 4, 8, 16)
  assert small_params['layers']['mlp']['down_FD'].shape == (3, 128, 16)
  tokens = random_batch(cfg.vocab_size, seed=3)['inputs']
  got = logits(small, small_params, tokens)
  assert np.all(np.isfinite(got))
  out = str(tmp_path / 'hf')
  hf_files.write(out, small, small_params)  # what `stoker convert --to-hf` writes
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    want = model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_layouts_round_trip():
  params = random_params(dataclasses.replace(CFG, scan_layers=False))
  assert params['layers']['mlp']['gate_DF'].shape == (3, 32, 256)
  unrolled = prune.unstack_layers(params, scan_layers=False)
  assert sorted(unrolled['layers']) == [0, 1, 2]
  again = prune.stack_layers(unrolled)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(x, y)
