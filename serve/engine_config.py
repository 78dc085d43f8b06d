"""The engine's configuration (EngineConfig: limits, budget buckets, features) and the layer-loop choice."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from serve import quant, speculative
from serve.attention import AttentionBackend
from serve.scheduler import Policy, SchedulerConfig


LAYER_LOOPS = ('auto', 'scan', 'unroll')
WEIGHT_LAYOUTS = ('auto', 'model', 'out_major')


# Measured on a 2-core AVX-512 CPU (2026-12-06, compiled decode step of 16 sequences): the tiny
# preset's 3 MB layers ran 1.10x faster scanned, the small preset's 25 MB layers 1.22x faster
# unrolled (int8 small, 6 MB layers: even). Copying a layer that fits the caches costs little;
# unrolled code pays more per op.
UNROLL_LAYER_BYTES = 8 * 2 ** 20
# Out-major weights (see out_major) from this width up. On a 2-core AVX-512 CPU, engine against
# engine: the small preset (768) decodes 16 sequences in 37-39 ms a step against 49-51 in the
# model's layout, and one in 14.4-15.1 against 16.0-16.9; narrower models ran faster in the model's
# layout (in-process paired runs, probes at cpu 97-98%): tiny (256) at 16 sequences 1.13x the
# out-major engine's tokens/s, the same greedy tokens, and a 12M model of width 384 at batch 1
# 1.07x. Widths in between were not measured.
OUT_MAJOR_MIN_WIDTH = 768


def unrolls(layer_loop: str, platform: str, layer_bytes: int) -> bool:
  """Whether the step unrolls its layers. Unrolled, the engine holds each layer's weights as
  separate arrays (serve/engine.py), which XLA reads in place; a scan (or static slices of
  stacked weights) copies every layer's weights before its products each step. 'auto': unrolled
  on accelerators (where the scanned decode also ran ~2x slower on an H100), and on CPU when a
  layer's weights (as the engine holds them) exceed UNROLL_LAYER_BYTES. 'scan' compiles fastest."""
  if layer_loop == 'auto':
    return platform != 'cpu' or layer_bytes > UNROLL_LAYER_BYTES
  return layer_loop == 'unroll'


def out_major(weight_layout: str, platform: str, d_model: int) -> bool:
  """Whether the engine holds its float weights as models.layers.OutMajor (contracted axes last,
  products computed weight first): 'auto' does on CPU for models of width OUT_MAJOR_MIN_WIDTH and
  up, where XLA's few-row GEMMs run faster so (measured in OutMajor's docstring); narrower models
  and accelerators keep the model's layout."""
  if weight_layout == 'auto':
    return platform == 'cpu' and d_model >= OUT_MAJOR_MIN_WIDTH
  return weight_layout == 'out_major'


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """The engine's limits. Pools hold num_pages pages of page_size tokens (page 0 is the null page);
  a request may hold up to max_pages_per_seq pages (prompt + max_tokens <= that * page_size)."""

  num_pages: int = 256
  page_size: int = 16
  max_seqs: int = 16
  max_pages_per_seq: int = 64
  token_budget: int = 256
  policy: Policy = Policy.CHUNKED
  watermark: float = 0.01
  prefix_caching: bool = True
  attention: AttentionBackend = AttentionBackend.AUTO
  # Smallest token bucket; buckets double up to token_budget. 1: a step of b <= 8 decodes pads to
  # the power of two >= b, not to 16 (on CPU, batch-1 decode of `small` 2.5x faster, measured).
  min_bucket: int = 1
  kv_dtype: str | None = None  # None: the model's compute dtype; 'int8': quantized (serve/quant.py)
  weight_dtype: str | None = None  # None: the params as given; 'int8': int8 weights, W8A8 matmuls
  compilation_cache_dir: str | None = None  # JAX persistent compilation cache, for fast restarts
  seed: int = 0  # draws the seeds of requests that bring none
  async_scheduling: bool = True  # plan step n+1 while step n runs (see the module docstring)
  layer_loop: str = 'auto'  # 'scan' | 'unroll' | 'auto': scan on CPU, unrolled on GPU and TPU
  weight_layout: str = 'auto'  # 'model' | 'out_major' | 'auto': out_major on CPU from width 768 (out_major)
  max_loras: int = 0  # LoRA adapter slots in device memory (0: no adapters); see serve/lora.py
  max_lora_rank: int = 16  # the slots' rank: adapters of lower rank are zero-padded (exact)
  speculative: str | None = None  # None: off; 'ngram': prompt lookup; 'draft': a draft model (attach_drafter)
  num_speculative_tokens: int = 0  # k: drafts per verification (>= 1 when speculative is set)
  speculative_max_batch: int = 4  # back-off: speculate only while the engine holds at most this many requests
  # per request: while a moving average of the drafts its verifications kept is below speculative_min_accepted,
  # it samples its next speculative_pause tokens without drafting (serve/speculative.py)
  speculative_min_accepted: float = 0.5
  speculative_pause: int = 16

  def __post_init__(self):
    object.__setattr__(self, 'policy', Policy(self.policy))
    object.__setattr__(self, 'attention', AttentionBackend(self.attention))
    if self.weight_dtype not in (None, *quant.WEIGHT_DTYPES):
      raise ValueError(f'EngineConfig.weight_dtype={self.weight_dtype!r}; use None (as given) or '
                       f'one of {quant.WEIGHT_DTYPES}.')
    if self.layer_loop not in LAYER_LOOPS:
      raise ValueError(f'EngineConfig.layer_loop={self.layer_loop!r}; use one of {LAYER_LOOPS}.')
    if self.weight_layout not in WEIGHT_LAYOUTS:
      raise ValueError(f'EngineConfig.weight_layout={self.weight_layout!r}; use one of {WEIGHT_LAYOUTS}.')
    for name in ('max_loras', 'max_lora_rank'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < (name == 'max_lora_rank'):
        raise ValueError(f'EngineConfig.{name}={value!r}; use an integer >= '
                         f'{int(name == "max_lora_rank")}.')
    self._check_speculative()
    if self.min_bucket < 1:
      raise ValueError(f'EngineConfig.min_bucket={self.min_bucket}; use a positive token count.')
    if self.max_seqs > self.token_budget:
      raise ValueError(f'EngineConfig.max_seqs={self.max_seqs} > token_budget={self.token_budget}: '
                       'a step could not decode every running sequence; raise token_budget.')
    self.scheduler_config()  # validates the shared fields, naming them

  def _check_speculative(self) -> None:
    k = self.num_speculative_tokens
    if self.speculative not in (None, *speculative.SPECULATIVE):
      raise ValueError(f'EngineConfig.speculative={self.speculative!r}; use None (off), \'ngram\' (prompt '
                       'lookup) or \'draft\' (a draft model).')
    if not isinstance(k, int) or isinstance(k, bool) or k < (1 if self.speculative else 0):
      raise ValueError(f'EngineConfig.num_speculative_tokens={k!r}; use an integer >= 1 with speculative='
                       f'{self.speculative!r} (--num-speculative-tokens, e.g. 4).')
    if k and not self.speculative:
      raise ValueError(f'EngineConfig.num_speculative_tokens={k} without a drafter; set speculative '
                       '(--speculative ngram, --draft-checkpoint or --draft-hf-dir) or use 0.')
    if k and k + 1 > self.token_budget:
      raise ValueError(f'EngineConfig.num_speculative_tokens={k}: a verification computes k + 1 = {k + 1} '
                       f'tokens of one sequence in one step, more than token_budget={self.token_budget}; '
                       'lower k or raise token_budget.')
    if k and k + 1 > self.max_pages_per_seq * self.page_size:
      raise ValueError(f'EngineConfig.num_speculative_tokens={k} exceeds a sequence\'s block table '
                       f'({self.max_pages_per_seq} pages of {self.page_size}); lower k.')
    if not self.speculative_min_accepted >= 0 or (k and self.speculative_min_accepted > k):
      raise ValueError(f'EngineConfig.speculative_min_accepted={self.speculative_min_accepted!r}: drafts kept per '
                       f'verification, from 0 (never pause) to num_speculative_tokens ({k}).')
    if not isinstance(self.speculative_pause, int) or self.speculative_pause < 1:
      raise ValueError(f'EngineConfig.speculative_pause={self.speculative_pause!r}; use an integer >= 1 (tokens a '
                       'paused request samples before it drafts again).')
    if not isinstance(self.speculative_max_batch, int) or self.speculative_max_batch < 1:
      raise ValueError(f'EngineConfig.speculative_max_batch={self.speculative_max_batch!r}; use an integer '
                       '>= 1 (speculate while at most that many sequences run).')

  @property
  def verify_width(self) -> int:
    """Verification rows per speculating sequence, k + 1 (0: speculation off)."""
    return self.num_speculative_tokens + 1 if self.speculative else 0

  @property
  def verify_slots(self) -> int:
    """Sequences one step can verify: at most speculative_max_batch run when a step drafts (0: off)."""
    return min(self.max_seqs, self.speculative_max_batch) if self.speculative else 0

  def scheduler_config(self) -> SchedulerConfig:
    return SchedulerConfig(self.num_pages, self.page_size, self.max_seqs, self.max_pages_per_seq,
                           self.token_budget, self.policy, self.watermark, self.prefix_caching,
                           self.max_loras)

  def buckets(self) -> tuple[int, ...]:
    """Token counts a step is padded to: min_bucket, 2 * min_bucket, ... and token_budget."""
    out, n = [], self.min_bucket
    while n < self.token_budget:
      out.append(n)
      n *= 2
    return tuple(out) + (self.token_budget,)


def layer_bytes(model_cfg, engine_cfg: EngineConfig) -> int:
  """Bytes of one decoder layer's weights as the engine holds them (int8: one byte a weight)."""
  D, V = model_cfg.d_model, model_cfg.vocab_size
  per_layer = (model_cfg.num_params() - V * D * (1 if model_cfg.tie_embeddings else 2) - D)
  itemsize = 1 if engine_cfg.weight_dtype == 'int8' else jnp.dtype(model_cfg.param_dtype).itemsize
  return per_layer // model_cfg.num_layers * itemsize
