"""Named model configurations. `tiny`, `tiny_moe` and `small` run here; the rest are built abstractly only."""

from __future__ import annotations

import dataclasses
import re

from models.config import ModelConfig, RopeScaling

_LLAMA3 = dict(vocab_size=128_256, num_kv_heads=8, head_dim=128, rope_theta=500_000.0)
_QWEN = dict(vocab_size=151_936, rope_theta=1_000_000.0, rms_eps=1e-6, tie_embeddings=True)

PRESETS: dict[str, ModelConfig] = {
    # ~5M parameters: trains on a laptop CPU in minutes; every dim divides an 8-device mesh.
    'tiny': ModelConfig(vocab_size=4096, d_model=256, num_layers=4, num_heads=8, num_kv_heads=4,
                        head_dim=32, mlp_dim=768),
    # ~126M parameters (GPT-3 Small width and depth, Llama blocks).
    'small': ModelConfig(vocab_size=32_768, d_model=768, num_layers=12, num_heads=12,
                         num_kv_heads=4, head_dim=64, mlp_dim=2048),
    'llama3_8b': ModelConfig(d_model=4096, num_layers=32, num_heads=32, mlp_dim=14_336, **_LLAMA3),
    'llama3_70b': ModelConfig(d_model=8192, num_layers=80, num_heads=64, mlp_dim=28_672,
                              **_LLAMA3),
    'llama31_8b': ModelConfig(d_model=4096, num_layers=32, num_heads=32, mlp_dim=14_336,
                              rope_scaling=RopeScaling(), **_LLAMA3),
    'mistral_7b': ModelConfig(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32,
                              num_kv_heads=8, head_dim=128, mlp_dim=14_336,
                              rope_theta=1_000_000.0),
    'qwen2_0_5b': ModelConfig(d_model=896, num_layers=24, num_heads=14, num_kv_heads=2,
                              head_dim=64, mlp_dim=4864, qkv_bias=True, **_QWEN),
    'qwen3_0_6b': ModelConfig(d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                              head_dim=128, mlp_dim=3072, qk_norm=True, **_QWEN),
    # Mixture of experts, ~9M parameters, ~4.5M active: `tiny` with 8 experts of width 256, top-2.
    # Load balance 0.1: at 0.01 the busiest expert still had ~3x the mean load after 100 steps
    # of tiny_cpu.gin (stdlib corpus); at 0.1 ~1.9x, with the same loss.
    'tiny_moe': ModelConfig(vocab_size=4096, d_model=256, num_layers=4, num_heads=8,
                            num_kv_heads=4, head_dim=32, mlp_dim=256, num_experts=8,
                            experts_per_token=2, load_balance_loss=0.1, router_z_loss=1e-3),
    # 46.7B parameters, 12.9B active (Mixtral of Experts, Jiang et al. 2024).
    'mixtral_8x7b': ModelConfig(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32,
                                num_kv_heads=8, head_dim=128, mlp_dim=14_336,
                                rope_theta=1_000_000.0, num_experts=8, experts_per_token=2,
                                load_balance_loss=0.02),
    # 30.5B parameters, 3.3B active (Qwen3 technical report); mlp_dim is its dense MLP width.
    'qwen3_30b_a3b': ModelConfig(vocab_size=151_936, d_model=2048, num_layers=48, num_heads=32,
                                 num_kv_heads=4, head_dim=128, mlp_dim=6144, moe_mlp_dim=768,
                                 qk_norm=True, rope_theta=1_000_000.0, rms_eps=1e-6,
                                 num_experts=128, experts_per_token=8, router='softmax_topk',
                                 router_renormalize=True, load_balance_loss=0.001),
}


# Tails of Hugging Face model names that do not change the architecture: -Instruct, -hf, -v0.1, ...
_VARIANT = re.compile(r'[-_](instruct|chat|hf|base|it|v\d+(\.\d+)*)$', re.IGNORECASE)


def _key(text: str) -> str:
  return re.sub(r'[^a-z0-9]', '', text.lower())


def resolve(name: str) -> str:
  """The preset `name` means: a preset name, or the same with hyphens or in any case (`llama3-8b`,
  `Llama-3-8B`), or a Hugging Face id or its tail (`meta-llama/Meta-Llama-3-8B`,
  `Qwen/Qwen3-0.6B`, `mistralai/Mistral-7B-Instruct-v0.1`); a ValueError listing the presets else."""
  if name in PRESETS:
    return name
  tail = name.rstrip('/').rsplit('/', 1)[-1]
  while (shorter := _VARIANT.sub('', tail)) != tail:
    tail = shorter
  by_key = {_key(p): p for p in PRESETS}
  vendor_dropped = re.split(r'[-_]', tail, maxsplit=1)[-1]  # Meta-Llama-3-8B -> Llama-3-8B
  for candidate in (tail, vendor_dropped):
    if _key(candidate) in by_key:
      return by_key[_key(candidate)]
  raise ValueError(f'Unknown model preset {name!r}; choose one of {sorted(PRESETS)} (hyphens, any case '
                   'and Hugging Face ids work too: llama3-8b, meta-llama/Meta-Llama-3-8B).')


def preset(name: str, **overrides) -> ModelConfig:
  """Returns the preset `name` (see `resolve` for the names it accepts), with any ModelConfig field
  replaced by `overrides`."""
  name = resolve(name)
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f'Unknown ModelConfig field(s) {sorted(unknown)}; fields are {sorted(fields)}.')
  return dataclasses.replace(PRESETS[name], **overrides)
