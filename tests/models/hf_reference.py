"""Tiny random Hugging Face models (PyTorch, CPU, float32) as the numerical reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from models import hf, transformer

FAMILIES = {
    'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM),
    'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny_hf_model(family='llama', seed=0, **kwargs):
  config_cls, model_cls = FAMILIES[family]
  fields = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10_000.0,
                tie_word_embeddings=False)
  fields.update(kwargs)
  torch.manual_seed(seed)
  model = model_cls(config_cls(**fields)).eval()
  with torch.no_grad():  # HF inits norms to 1 and biases to 0; randomise them so they matter.
    for name, p in model.named_parameters():
      if name.endswith('norm.weight') or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


def stoker_model(hf_model, **overrides) -> transformer.Transformer:
  """The same weights in a Stoker Transformer."""
  cfg = hf.config_from_hf(hf_model.config.to_dict(), **overrides)
  weights = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  model = transformer.Transformer(cfg, nnx.Rngs(0))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax_tree(hf.params_from_hf(cfg, weights)))
  nnx.update(model, state)
  return model


def jax_tree(tree):
  if isinstance(tree, dict):
    return {k: jax_tree(v) for k, v in tree.items()}
  return jnp.asarray(tree)


def hf_logits(hf_model, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    kwargs = {} if positions is None else {'position_ids': torch.as_tensor(positions)}
    return hf_model(torch.as_tensor(tokens), **kwargs).logits.numpy()
