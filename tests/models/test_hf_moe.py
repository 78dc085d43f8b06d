"""Mixtral and Qwen3-MoE checkpoints <-> Stoker, against `transformers` (PyTorch CPU, float32).

Each tiny random model is saved with save_pretrained (one tensor per expert, as on the Hub), read
with hf_files, and compared with the PyTorch model: logits within f32 tolerance, the serving
engine's greedy generations equal to `generate`; written back, every tensor is bit-identical.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from models import hf, hf_files, transformer
from tests.models.hf_reference import hf_logits, jax_tree

ATOL = 1e-4  # float32 logits of magnitude ~1 after two layers (DESIGN.md, tolerances)

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
FAMILIES = {
    'mixtral': (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2)),
    'qwen3_moe': (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48,
                       norm_topk_prob=True)),
}


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
  """(torch model, its save_pretrained directory)."""
  config_cls, model_cls, kwargs = FAMILIES[request.param]
  torch.manual_seed(0)
  model = model_cls(config_cls(**COMMON, **kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):  # HF inits norms to 1: randomise them so they matter
        p.add_(0.1 * torch.randn_like(p))
      if name.endswith('gate.weight'):  # decisive routing: no near-ties for rounding to flip
        p.mul_(30.0)
  directory = str(tmp_path_factory.mktemp(request.param) / 'hf')
  model.save_pretrained(directory)
  return model, directory


def _stoker(directory, **overrides):
  cfg = hf.config_from_hf(hf_files.read_config(directory), dtype='float32', **overrides)
  cfg, params = hf_files.load_params(directory, cfg)
  model = transformer.Transformer(cfg, nnx.Rngs(0))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax_tree(params))
  nnx.update(model, state)
  return cfg, params, model


def test_logits_match_transformers(saved):
  model, directory = saved
  tokens = np.random.default_rng(0).integers(0, 128, (2, 20)).astype(np.int32)
  expected = hf_logits(model, tokens)
  for scan in (True, False):
    _, _, ours = _stoker(directory, scan_layers=scan)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), expected, atol=ATOL, rtol=0)


def test_round_trip_is_bit_exact(saved, tmp_path):
  model, directory = saved
  cfg, params, _ = _stoker(directory)
  out = str(tmp_path / 'exported')
  hf_files.write(out, cfg, params, base_config=hf_files.read_config(directory))
  original, exported = load_file(f'{directory}/model.safetensors'), load_file(f'{out}/model.safetensors')
  assert set(exported) == set(original)
  for name, x in original.items():
    np.testing.assert_array_equal(exported[name], x, err_msg=name)
  assert hf.config_from_hf(hf_files.read_config(out)) == hf.config_from_hf(model.config.to_dict())
  assert hf_files.read_config(out)['model_type'] == model.config.model_type


def test_served_greedy_generations_match_transformers_generate(saved):
  from serve.engine import Engine, EngineConfig
  from serve.sampling import SamplingParams
  import jax
  from parallelism.mesh import MeshConfig, make_mesh
  model, directory = saved
  cfg, _, ours = _stoker(directory)
  params = nnx.state(ours)
  # Prompts longer than the token budget: chunked prefill, then decodes of both sequences.
  prompts = [np.random.default_rng(n).integers(0, 128, n).tolist() for n in (5, 21)]
  refs = []
  for prompt in prompts:
    with torch.no_grad():
      ref = model.generate(torch.as_tensor([prompt]), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    refs.append(ref[0, len(prompt):].tolist())
  # Mixtral also on a 2-way tensor-parallel mesh (experts split over their width).
  meshes = [None] + ([make_mesh(MeshConfig(ici=(1, 1, 2)), jax.devices()[:2])]
                     if model.config.model_type == 'mixtral' else [])
  for mesh in meshes:
    engine = Engine(cfg, params, EngineConfig(num_pages=32, page_size=8, max_seqs=2,
                                              max_pages_per_seq=4, token_budget=16,
                                              min_bucket=16), mesh)
    assert engine.generate(prompts, SamplingParams(max_tokens=8)) == refs, mesh


def test_unsupported_moe_layouts_are_refused():
  config_cls, _, kwargs = FAMILIES['qwen3_moe']
  bad = config_cls(**COMMON, **kwargs, mlp_only_layers=[1]).to_dict()
  bad['architectures'] = ['Qwen3MoeForCausalLM']
  with pytest.raises(ValueError, match='mlp_only_layers'):
    hf.config_from_hf(bad)
  cfg = hf.config_from_hf(config_cls(**COMMON, **kwargs).to_dict())
  import dataclasses
  with pytest.raises(ValueError, match='shared experts'):
    hf.architecture(dataclasses.replace(cfg, shared_mlp_dim=32))
