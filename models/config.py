"""The model schema: one frozen dataclass describes every Llama-family decoder Stoker builds."""

from __future__ import annotations

import dataclasses
import enum


class AttentionImpl(str, enum.Enum):
  """Which attention implementation the model runs."""

  AUTO = 'auto'  # The fastest that applies: cudnn on GPU (bf16/f16), splash on TPU, else xla.
  XLA = 'xla'  # Plain einsum + mask; runs everywhere, the reference.
  SPLASH = 'splash'  # TPU splash-attention Pallas kernel (interpret mode on CPU).
  CUDNN = 'cudnn'  # cuDNN fused attention through jax.nn.dot_product_attention (GPU only).


# Names accepted by ModelConfig.remat; each maps to a jax.checkpoint policy (None: no remat).
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 style RoPE frequency scaling (`rope_type: llama3` in Hugging Face configs)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder. Field names follow the dimension vocabulary in DESIGN.md."""

  vocab_size: int  # V
  d_model: int  # D
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K (K == N: MHA, 1 < K < N: GQA, K == 1: MQA)
  head_dim: int  # H
  mlp_dim: int  # F
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  rms_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys
  scan_layers: bool = True
  remat: str = 'none'
  attention: AttentionImpl = AttentionImpl.AUTO
  param_dtype: str = 'float32'
  dtype: str = 'auto'  # compute dtype; 'auto' is float32 on CPU and bfloat16 on TPU/GPU

  def __post_init__(self):
    object.__setattr__(self, 'attention', AttentionImpl(self.attention))
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads',
                 'head_dim', 'mlp_dim'):
      if getattr(self, name) <= 0:
        raise ValueError(f'ModelConfig.{name} must be positive, got {getattr(self, name)}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads '
          f'({self.num_kv_heads}): each key/value head serves a whole group of query heads.')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'ModelConfig.remat={self.remat!r}; choose one of {REMAT_POLICIES}.')
    for name in ('param_dtype', 'dtype'):
      if getattr(self, name) not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; use 'float32', "
                         "'bfloat16' or 'float16' ('auto' only for dtype).")
    if self.param_dtype == 'auto':
      raise ValueError("ModelConfig.param_dtype cannot be 'auto'; use 'float32' or 'bfloat16'.")

  def compute_dtype(self, platform: str) -> str:
    """The dtype matmuls run in on `platform` ('cpu', 'gpu', 'tpu')."""
    if self.dtype != 'auto':
      return self.dtype
    return 'float32' if platform == 'cpu' else 'bfloat16'

  def num_params(self) -> int:
    """Parameter count, computed from the shapes the model creates (see tests for the cross-check)."""
    D, F, N, K, H, V, L = (self.d_model, self.mlp_dim, self.num_heads, self.num_kv_heads,
                           self.head_dim, self.vocab_size, self.num_layers)
    attn = D * N * H + 2 * D * K * H + N * H * D
    attn += (N * H + 2 * K * H) if self.qkv_bias else 0
    attn += 2 * H if self.qk_norm else 0
    per_layer = attn + 3 * D * F + 2 * D
    return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x matmul params + causal attention.

    Counts the LM head but not the embedding lookup (a gather), and the attention score and
    value matmuls (2 x 2 x T x N x H per layer forward, x3 for backward), as in the PaLM paper.
    """
    matmul_params = self.num_params() - self.vocab_size * self.d_model * (
        0 if self.tie_embeddings else 1)
    attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
    return 6 * matmul_params + attention
