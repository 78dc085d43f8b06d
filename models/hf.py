"""Hugging Face Llama/Mistral/Qwen2/Qwen3 configs and weights -> Stoker's layout (numpy, no torch).

The tests use this to compare logits with `transformers`; `stoker convert` builds on it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from models.config import ModelConfig, RopeScaling

# config.json `model_type` -> the architecture it names.
SUPPORTED = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
             'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """A ModelConfig from a Hugging Face `config.json` dict."""
  arch = SUPPORTED.get(hf.get('model_type'))
  if arch is None or arch not in (hf.get('architectures') or [arch]):
    raise ValueError(f"Unsupported model: model_type={hf.get('model_type')!r}, "
                     f"architectures={hf.get('architectures')}; supported: {SUPPORTED}.")
  scaling = hf.get('rope_scaling') or (hf.get('rope_parameters') or {})
  rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
  if rope_type not in ('default', 'llama3'):
    raise ValueError(f'Unsupported rope_scaling type {rope_type!r}; supported: default, llama3.')
  theta = hf.get('rope_theta', (hf.get('rope_parameters') or {}).get('rope_theta', 10_000.0))
  heads = hf['num_attention_heads']
  fields = dict(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
      num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp_dim=hf['intermediate_size'], rope_theta=float(theta), rms_eps=hf['rms_norm_eps'],
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      qkv_bias=arch == 'Qwen2ForCausalLM' or bool(hf.get('attention_bias', False)),
      qk_norm=arch == 'Qwen3ForCausalLM',
      rope_scaling=RopeScaling(
          factor=scaling['factor'], low_freq_factor=scaling['low_freq_factor'],
          high_freq_factor=scaling['high_freq_factor'],
          original_max_position=scaling['original_max_position_embeddings'],
      ) if rope_type == 'llama3' else None)
  fields.update(overrides)
  return ModelConfig(**fields)


def params_from_hf(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> dict:
  """Nested dict of arrays shaped like `nnx.state(Transformer(cfg))`, from HF tensor names.

  `weights` maps names such as 'model.layers.0.self_attn.q_proj.weight' to numpy arrays.
  """
  D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def get(name):
    if name not in weights:
      raise KeyError(f'Missing tensor {name!r} for {cfg.num_layers} layers; found e.g. '
                     f'{sorted(weights)[:5]}.')
    return np.asarray(weights[name])

  def layer(i):
    p = f'model.layers.{i}.'
    attn = {
        'q_DNH': get(p + 'self_attn.q_proj.weight').T.reshape(D, N, H),
        'k_DKH': get(p + 'self_attn.k_proj.weight').T.reshape(D, K, H),
        'v_DKH': get(p + 'self_attn.v_proj.weight').T.reshape(D, K, H),
        'o_NHD': get(p + 'self_attn.o_proj.weight').T.reshape(N, H, D),
    }
    if cfg.qkv_bias:
      attn['bias'] = {'q_NH': get(p + 'self_attn.q_proj.bias').reshape(N, H),
                      'k_KH': get(p + 'self_attn.k_proj.bias').reshape(K, H),
                      'v_KH': get(p + 'self_attn.v_proj.bias').reshape(K, H)}
    if cfg.qk_norm:
      attn['q_norm'] = {'scale': get(p + 'self_attn.q_norm.weight')}
      attn['k_norm'] = {'scale': get(p + 'self_attn.k_norm.weight')}
    return {
        'attn_norm': {'scale': get(p + 'input_layernorm.weight')},
        'attn': attn,
        'mlp_norm': {'scale': get(p + 'post_attention_layernorm.weight')},
        'mlp': {'gate_DF': get(p + 'mlp.gate_proj.weight').T,
                'up_DF': get(p + 'mlp.up_proj.weight').T,
                'down_FD': get(p + 'mlp.down_proj.weight').T},
    }

  layers = [layer(i) for i in range(cfg.num_layers)]
  out = {
      'embed_VD': get('model.embed_tokens.weight'),
      'final_norm': {'scale': get('model.norm.weight')},
      'layers': (_stack(layers) if cfg.scan_layers else dict(enumerate(layers))),
  }
  if not cfg.tie_embeddings:
    out['lm_head_DV'] = get('lm_head.weight').T
  return out


def _stack(trees: list[dict]) -> dict:
  first = trees[0]
  if isinstance(first, dict):
    return {k: _stack([t[k] for t in trees]) for k in first}
  return np.stack(trees)
