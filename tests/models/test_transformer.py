"""The decoder against Hugging Face `transformers` (PyTorch CPU, float32) on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from tests.models.hf_reference import hf_logits, stoker_model, tiny_hf_model

ATOL = 1e-4  # float32 logits of magnitude ~1 after a few layers; see DESIGN.md on tolerances.


def _tokens(batch, length, vocab=128, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize('family,kwargs', [
    ('llama', {}),
    ('llama', dict(num_key_value_heads=4)),  # MHA
    ('llama', dict(num_key_value_heads=1)),  # MQA
    ('llama', dict(head_dim=64, hidden_size=128)),
    ('llama', dict(head_dim=80)),
    ('llama', dict(head_dim=96)),
    ('llama', dict(head_dim=128, num_attention_heads=2, num_key_value_heads=1)),
    ('llama', dict(head_dim=256, num_attention_heads=2, num_key_value_heads=2)),
    ('llama', dict(tie_word_embeddings=True)),
    ('llama', dict(rope_theta=500_000.0, rope_scaling=dict(
        rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    ('mistral', {}),
    ('qwen2', dict(rms_norm_eps=1e-6)),
    ('qwen3', dict(rms_norm_eps=1e-6)),
])
def test_logits_match_transformers(family, kwargs):
  ref = tiny_hf_model(family, **kwargs)
  tokens = _tokens(2, 48)
  expected = hf_logits(ref, tokens)
  for scan in (True, False):
    got = stoker_model(ref, scan_layers=scan, dtype='float32')(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got), expected, atol=ATOL, rtol=0)


def test_remat_changes_nothing():
  ref = tiny_hf_model('llama')
  tokens = jnp.asarray(_tokens(2, 32))
  base = stoker_model(ref)(tokens)
  for policy in ('full', 'dots_saveable'):
    model = stoker_model(ref, remat=policy)
    np.testing.assert_allclose(jax.jit(lambda t, m=model: m(t))(tokens), base, atol=1e-5, rtol=0)


def test_packed_documents_match_separate_runs():
  """Three documents packed in one row, positions restarting, equal each document run alone."""
  ref = tiny_hf_model('llama')
  lengths = (10, 17, 5)
  docs = [_tokens(1, n, seed=i)[0] for i, n in enumerate(lengths)]
  tokens = np.concatenate(docs)[None]
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  got = np.asarray(stoker_model(ref)(jnp.asarray(tokens), jnp.asarray(positions),
                                     jnp.asarray(segments)))
  start = 0
  for doc in docs:
    expected = hf_logits(ref, doc[None])[0]
    np.testing.assert_allclose(got[0, start:start + len(doc)], expected, atol=ATOL, rtol=0)
    start += len(doc)


def test_parameter_count_matches_created_shapes():
  from flax import nnx
  from models import transformer
  for name in ('tiny', 'small', 'qwen2_0_5b', 'qwen3_0_6b'):
    cfg = presets.preset(name, num_layers=2)
    abstract = nnx.eval_shape(lambda c=cfg: transformer.Transformer(c, nnx.Rngs(0)))
    created = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
    assert created == cfg.num_params(), name


def test_no_loss_depends_on_a_later_token_or_another_document():
  """d loss_t / d (input embedding at s) is nonzero exactly when s <= t in the same document.

  Every position gets a distinct token id, so the gradient with respect to row s of the
  embedding table is the gradient with respect to the input at position s.
  """
  from flax import nnx
  from models import transformer
  T = 24
  cfg = presets.preset('tiny', num_layers=2, vocab_size=T)
  model = transformer.Transformer(cfg, nnx.Rngs(3))
  graphdef, params = nnx.split(model)
  tokens = jnp.arange(T, dtype=jnp.int32)[None]
  segments = jnp.asarray([[1] * 9 + [2] * 11 + [0] * 4], jnp.int32)  # two documents + padding
  positions = jnp.asarray([list(range(9)) + list(range(11)) + list(range(4))], jnp.int32)
  targets = jnp.roll(tokens, -1, axis=1)

  def per_position_loss(embed_VD):
    p = jax.tree.map(lambda x: x, params)
    p['embed_VD'] = nnx.Param(embed_VD)
    logits = nnx.merge(graphdef, p)(tokens, positions, segments)[0]
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[0][:, None], 1)[:, 0]

  jac_TVD = jax.jacrev(per_position_loss)(params['embed_VD'][...])
  depends_TS = np.asarray(jnp.abs(jac_TVD).sum(-1) > 0)
  seg = np.asarray(segments[0])
  allowed_TS = (seg[:, None] == seg[None, :]) & (np.arange(T)[:, None] >= np.arange(T)[None, :])
  np.testing.assert_array_equal(depends_TS, allowed_TS)
