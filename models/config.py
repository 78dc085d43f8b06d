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

# Mixture-of-experts routers (models/moe.py): 'topk_softmax' (Mixtral) takes the top k router logits
# and softmaxes them; 'softmax_topk' (Qwen-MoE) softmaxes over all experts and keeps the top k
# probabilities, renormalised to sum to 1 if router_renormalize (Qwen3-MoE's norm_topk_prob).
ROUTERS = ('topk_softmax', 'softmax_topk')
# How the experts' matmuls run: 'auto' (ragged_dot on TPU, 'tiled' elsewhere: XLA:CPU lowers
# ragged_dot to one dense matmul over every expert), 'ragged_dot', 'tiled' (see models/moe.py).
GROUPED_MATMULS = ('auto', 'ragged_dot', 'megablox', 'tiled')


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
  # Mixture of experts (models/moe.py); num_experts 0: every MLP is dense (mlp_dim wide).
  num_experts: int = 0  # E
  experts_per_token: int = 0  # k
  moe_mlp_dim: int = 0  # each expert's width; 0: mlp_dim
  shared_mlp_dim: int = 0  # width of the shared experts (one SwiGLU MLP every token runs); 0: none
  router: str = 'topk_softmax'
  router_renormalize: bool = False
  load_balance_loss: float = 0.0  # weight of the load-balancing loss in the training objective
  router_z_loss: float = 0.0  # weight of the router z-loss (mean squared router logsumexp)
  capacity_factor: float = 0.0  # 0: dropless; > 0: each expert takes ceil(cf * T * k / E) tokens
  grouped_matmul: str = 'auto'

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
    self._check_moe()

  @property
  def moe(self) -> bool:
    return self.num_experts > 0

  @property
  def expert_mlp_dim(self) -> int:
    return self.moe_mlp_dim or self.mlp_dim

  def _check_moe(self):
    for name in ('num_experts', 'experts_per_token', 'moe_mlp_dim', 'shared_mlp_dim',
                 'load_balance_loss', 'router_z_loss', 'capacity_factor'):
      if getattr(self, name) < 0:
        raise ValueError(f'ModelConfig.{name} must be >= 0, got {getattr(self, name)}.')
    if not self.moe:
      moe_only = [n for n in ('experts_per_token', 'moe_mlp_dim', 'shared_mlp_dim',
                              'load_balance_loss', 'router_z_loss', 'capacity_factor')
                  if getattr(self, n)]
      if moe_only:
        raise ValueError(f'ModelConfig sets {moe_only} but num_experts=0 (a dense model); set '
                         'num_experts to make the MLPs mixtures of experts.')
      return
    if not 1 <= self.experts_per_token <= self.num_experts:
      raise ValueError(f'ModelConfig.experts_per_token={self.experts_per_token} must be between 1 '
                       f'and num_experts={self.num_experts}.')
    if self.router not in ROUTERS:
      raise ValueError(f'ModelConfig.router={self.router!r}; choose one of {ROUTERS}.')
    if self.router_renormalize and self.router == 'topk_softmax':
      raise ValueError("ModelConfig.router_renormalize applies to router='softmax_topk' only "
                       "('topk_softmax' weights already sum to 1).")
    if self.grouped_matmul not in GROUPED_MATMULS:
      raise ValueError(f'ModelConfig.grouped_matmul={self.grouped_matmul!r}; choose one of '
                       f'{GROUPED_MATMULS}.')

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
    per_layer = attn + self._mlp_params(active=False) + 2 * D
    return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D

  def num_active_params(self) -> int:
    """Parameters one token uses: num_params with each MoE layer's experts cut to k of E."""
    L = self.num_layers
    return self.num_params() - L * (self._mlp_params(False) - self._mlp_params(True))

  def _mlp_params(self, active: bool) -> int:
    D = self.d_model
    if not self.moe:
      return 3 * D * self.mlp_dim
    experts = self.experts_per_token if active else self.num_experts
    return D * self.num_experts + 3 * D * (experts * self.expert_mlp_dim + self.shared_mlp_dim)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x matmul params + causal attention.

    Mixtures of experts count their active parameters (the k experts a token runs, and the router).
    Counts the LM head but not the embedding lookup (a gather), and the attention score and
    value matmuls (2 x 2 x T x N x H per layer forward, x3 for backward), as in the PaLM paper.
    """
    matmul_params = self.num_active_params() - self.vocab_size * self.d_model * (
        0 if self.tie_embeddings else 1)
    attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
    return 6 * matmul_params + attention
