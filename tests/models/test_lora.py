"""LoRA adapters: the base model when b = 0, merged = unmerged, gradients reach only the adapters,
PEFT files both ways against `transformers` + `peft`, and the errors for adapters that do not fit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from models import hf, lora, peft_files, quant
from models.presets import preset
from models.transformer import Transformer
from tests.models.hf_reference import hf_logits, stoker_model, tiny_hf_model

TOKENS = np.arange(2 * 12).reshape(2, 12) * 7 % 128


def _model(scan_layers=True):
  cfg = preset('tiny', num_layers=2, vocab_size=128, d_model=64, num_heads=4, num_kv_heads=2,
               head_dim=16, mlp_dim=128, scan_layers=scan_layers)
  return cfg, nnx.split(Transformer(cfg, nnx.Rngs(0)))


def _perturbed(adapters, seed=1, size=0.05):
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + size * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


@pytest.mark.parametrize('scan_layers', [True, False])
def test_zero_b_is_the_base_model_and_merging_changes_nothing(scan_layers):
  cfg, (graphdef, params) = _model(scan_layers)
  config = lora.LoRAConfig(rank=4, alpha=8.0)
  adapters = lora.init_adapters(cfg, params, config, jax.random.key(1))
  assert len(jax.tree.leaves(adapters)) == 2 * 7 * (1 if scan_layers else cfg.num_layers)
  base = nnx.merge(graphdef, params)(TOKENS)
  np.testing.assert_array_equal(nnx.merge(graphdef, lora.attach(cfg, params, adapters, config))(TOKENS),
                                base)
  adapters = _perturbed(adapters)
  unmerged = nnx.merge(graphdef, lora.attach(cfg, params, adapters, config))(TOKENS)
  merged = nnx.merge(graphdef, lora.merge(cfg, params, adapters, config))(TOKENS)
  assert float(jnp.abs(unmerged - base).max()) > 0.1  # the adapters do change the model
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_adapter_and_follow_the_merged_model():
  cfg, (graphdef, params) = _model()
  config = lora.LoRAConfig(rank=2, alpha=4.0, targets=r'attn/(q_DNH|o_NHD)$')
  adapters = _perturbed(lora.init_adapters(cfg, params, config, jax.random.key(1)))

  def loss(adapters, merge):
    p = (lora.merge if merge else lora.attach)(cfg, params, adapters, config)
    return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(TOKENS))[..., 0])

  grads = jax.grad(loss)(adapters, False)
  assert {'/'.join(p) for p, _ in nnx.to_flat_state(grads)} == {
      'layers/attn/q_DNH/lora_a', 'layers/attn/q_DNH/lora_b',
      'layers/attn/o_NHD/lora_a', 'layers/attn/o_NHD/lora_b'}
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  # Through the merged weights the same function, so the same gradients (float32 rounding apart).
  jax.tree.map(lambda g, m: np.testing.assert_allclose(g, m, atol=1e-6, rtol=1e-4),
               grads, jax.grad(loss)(adapters, True))


@pytest.mark.parametrize('scan_layers', [True, False])
def test_qlora_over_an_int8_base_is_lora_over_the_float_base_it_stores(scan_layers):
  cfg, (graphdef, params) = _model(scan_layers)
  config = lora.LoRAConfig(rank=4, alpha=8.0, base_dtype='int8')
  adapters = _perturbed(lora.init_adapters(cfg, params, config, jax.random.key(1)))
  int8 = jax.jit(lambda p: lora.quantize_base(p, config))(params)
  kinds = {'/'.join(map(str, p)): type(v.get_value()) for p, v in nnx.to_flat_state(int8)}
  assert {n for n, k in kinds.items() if k is quant.WeightOnly} == {
      n for n in kinds if n.split('/')[-1] in lora.QUANTIZED_BASE}  # embedding, LM head, norms as stored
  stored = quant.dequantize(int8, jnp.float32)  # the float base the int8 one stands for

  def loss(adapters, base):
    logits = nnx.merge(graphdef, lora.attach(cfg, base, adapters, config))(TOKENS)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  (got, grads), (want, ref) = (jax.value_and_grad(loss)(adapters, b) for b in (int8, stored))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4), grads, ref)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))  # every layer's adapters learn
  # Merged, the adapters fold into that same base (not the float one the int8 was made from).
  merged = nnx.merge(graphdef, lora.merge(cfg, params, adapters, config))(TOKENS)
  np.testing.assert_allclose(merged, nnx.merge(graphdef, lora.attach(cfg, int8, adapters, config))(TOKENS),
                             atol=2e-5, rtol=1e-5)


def test_dropout_is_unbiased_and_off_without_a_key():
  x = jax.random.normal(jax.random.key(0), (4, 6, 32))
  w = jax.random.normal(jax.random.key(1), (32, 2, 8))
  a = jax.random.normal(jax.random.key(2), (32, 4))
  b = jax.random.normal(jax.random.key(3), (4, 2, 8))
  plain = lora.LoRA(w, a, b, None, 0.5, 0.3).einsum('BTD,DNH->BTNH', x)
  expect = jnp.einsum('BTD,DNH->BTNH', x, w) + 0.5 * jnp.einsum('BTD,DR,RNH->BTNH', x, a, b)
  np.testing.assert_allclose(plain, expect, atol=1e-4, rtol=1e-5)
  keys = jax.random.split(jax.random.key(4), 4000)
  dropped = jax.vmap(lambda k: lora.LoRA(w, a, b, k, 0.5, 0.3).einsum('BTD,DNH->BTNH', x))(keys)
  assert float(jnp.abs(dropped[0] - plain).max()) > 0.1
  # Inverted dropout: the mean over draws tends to the undropped product (error ~ 1/sqrt(draws)).
  spread = jnp.std(dropped, axis=0) / np.sqrt(len(keys))
  assert float(jnp.max(jnp.abs(dropped.mean(0) - plain) / spread)) < 5.5


def test_targets_that_match_nothing_or_no_matrix_are_refused():
  cfg, (_, params) = _model()
  with pytest.raises(ValueError, match=r"matches no parameter.*layers/attn"):
    lora.init_adapters(cfg, params, lora.LoRAConfig(targets='qproj'), jax.random.key(0))
  with pytest.raises(ValueError, match=r'selects final_norm/scale, which is not a weight matrix'):
    lora.init_adapters(cfg, params, lora.LoRAConfig(targets='norm'), jax.random.key(0))
  for bad, field in ((dict(rank=0), 'rank'), (dict(alpha=0.0), 'alpha'), (dict(dropout=1.0), 'dropout'),
                     (dict(targets='('), 'targets')):
    with pytest.raises(ValueError, match=f'lora.{field}'):
      lora.LoRAConfig(**bad)


@pytest.fixture(scope='module')
def hf_base():
  return tiny_hf_model('llama', seed=3)


def _peft_logits(hf_base, adapter_dir):
  model = peft.PeftModel.from_pretrained(hf_base, adapter_dir)
  try:
    with torch.no_grad():
      return model(torch.as_tensor(TOKENS)).logits.numpy()
  finally:
    model.unload()  # puts the base back as it was, for the next test


@pytest.mark.parametrize('scan_layers', [True, False])
def test_exported_adapter_gives_stokers_logits_in_transformers_and_peft(hf_base, tmp_path, scan_layers):
  model = stoker_model(hf_base, scan_layers=scan_layers)
  cfg, (graphdef, params) = model.cfg, nnx.split(model)
  config = lora.LoRAConfig(rank=4, alpha=12.0, targets=r'(q_DNH|v_DKH|o_NHD|down_FD)$')
  adapters = _perturbed(lora.init_adapters(cfg, params, config, jax.random.key(2)), size=0.2)
  ours = nnx.merge(graphdef, lora.attach(cfg, params, adapters, config))(TOKENS)
  peft_files.write(str(tmp_path / 'adapter'), cfg, adapters, config)
  written = json.loads((tmp_path / 'adapter' / peft_files.CONFIG).read_text())
  assert sorted(written['target_modules']) == ['down_proj', 'o_proj', 'q_proj', 'v_proj']
  theirs = _peft_logits(hf_base, str(tmp_path / 'adapter'))
  assert np.abs(theirs - hf_logits(hf_base, TOKENS)).max() > 0.1
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_an_adapter_made_with_peft_loads_with_equal_logits(hf_base, tmp_path):
  torch.manual_seed(5)
  made = peft.get_peft_model(hf_base, peft.LoraConfig(
      r=3, lora_alpha=7, target_modules=['k_proj', 'up_proj', 'gate_proj'], layers_to_transform=[1],
      init_lora_weights=False, use_rslora=True))
  made.save_pretrained(str(tmp_path / 'made'))
  with torch.no_grad():
    theirs = made(torch.as_tensor(TOKENS)).logits.numpy()
  made.unload()
  model = stoker_model(hf_base)
  cfg, (graphdef, params) = model.cfg, nnx.split(model)
  adapters, config = peft_files.read(str(tmp_path / 'made'), cfg)
  assert (config.rank, config.alpha, config.rslora) == (3, 7.0, True)
  ours = nnx.merge(graphdef, lora.attach(cfg, params, adapters, config))(TOKENS)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  # Layer 0 was not adapted: its factors are zero.
  assert not np.any(np.asarray(nnx.to_pure_dict(adapters)['layers']['attn']['k_DKH']['lora_b'][0]))


def test_adapters_of_another_base_or_kind_are_refused(hf_base, tmp_path):
  made = peft.get_peft_model(hf_base, peft.LoraConfig(r=2, target_modules=['q_proj']))
  made.save_pretrained(str(tmp_path / 'q'))
  made.unload()
  other = hf.config_from_hf(tiny_hf_model('llama', hidden_size=96, num_hidden_layers=2).config.to_dict())
  with pytest.raises(ValueError, match=r'q_proj.lora_A has shape \(2, 64\), expected \(2, 96\)'):
    peft_files.read(str(tmp_path / 'q'), other)
  deeper = hf.config_from_hf(hf_base.config.to_dict(), num_layers=1)
  with pytest.raises(ValueError, match=r'adapts modules the base does not have: model.layers.1'):
    peft_files.read(str(tmp_path / 'q'), deeper)
  body = json.loads((tmp_path / 'q' / peft_files.CONFIG).read_text())
  (tmp_path / 'q' / peft_files.CONFIG).write_text(json.dumps({**body, 'use_dora': True}))
  with pytest.raises(ValueError, match=r'use_dora=True is not supported'):
    peft_files.read(str(tmp_path / 'q'), hf.config_from_hf(hf_base.config.to_dict()))
  with pytest.raises(FileNotFoundError, match='no adapter_config.json'):
    peft_files.read(str(tmp_path), other)
