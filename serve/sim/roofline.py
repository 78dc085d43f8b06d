"""Analytic step time of the engine on a device that has no profile: a roofline per step.

For one engine step (StepShape; T = its tokens padded to the engine's bucket, as the engine pads):
  compute_s   = FLOPs / (tp * peak_flops * compute_efficiency)
      FLOPs   = 2 * T * L * (matmul params of a layer)        every token through every weight
              + 2 * max_seqs * D * V                         the LM head, on the engine's max_seqs rows
              + 4 * L * N * H * sum(q_len * kv_len)          attention scores and values
  memory_s    = bytes one chip moves / (hbm_bytes_per_s * memory_efficiency)
      bytes   = (L * layer params + D * V) * dtype_bytes / tp     weights, read once per step
              + (sum kv_len + sum q_len) * kv_bytes_per_token      KV read, and written
              + T * L * (4D + (2(N + 2K)H + 2NH + 6F) / tp) * dtype_bytes   activations, written and
                read once each (residual and norm unsharded; q/k/v, attention out, MLP sharded)
  allreduce_s = 2 * L * (2 (tp - 1) / tp * T * D * dtype_bytes / link_bytes_per_s + latency), tp > 1:
                tensor parallelism all-reduces the [T, D] activations after attention and after the
                MLP of every layer (ring algorithm; not overlapped with compute)
  step_time_s = max(compute_s, memory_s) + allreduce_s + host_overhead_s
KV heads are split over the tensor axis; a chip holds ceil(K / tp) of them (replicated when tp > K).

Efficiency defaults: memory 0.8 (paged decode kernels reach 70-90% of peak HBM bandwidth), compute
0.5 (large-matmul utilisation of well-tuned serving prefill is 40-60% of peak). Host overhead 1 ms
per step: the engine's scheduling, buffers, dispatch and token read-back that the device step does
not hide (the tiny CPU profile's host.csv: schedule + update + buffers ~0.1-0.5 ms for 1-16
sequences; dispatch and the token transfer come on top). Per-collective latency 10 us.

Measured against it (serve/sim/profiles/llama3_8b_h100: Stoker's engine, Llama-3-8B bf16, one H100,
JAX 0.11.2): every step took 3.8-4.6x this model's ideal (efficiencies 1, no host overhead), a decode
~20 ms against 4.5 ms, ~3.6x these defaults; unrolled layers (scan_layers=False) ~10.6 ms. So these
defaults describe a well-tuned engine; to model the engine as measured there, pass e.g.
memory_efficiency=0.22 (scanned) or 0.42 (unrolled), or plan on a profile of the real device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from models.config import ModelConfig
from serve.engine import EngineConfig
from serve.sim.devices import Device
from serve.sim.shape import StepShape

COMPUTE_EFFICIENCY = 0.5
MEMORY_EFFICIENCY = 0.8
HOST_OVERHEAD_S = 1e-3
COLLECTIVE_LATENCY_S = 10e-6
HBM_USABLE = 0.9  # of HBM left to weights, activations and KV after the runtime's own reserve


def padded_tokens(num_tokens: int, buckets: Sequence[int]) -> int:
  """The engine's bucket for num_tokens; past the largest, the next doubling of the smallest
  (what an engine with a bigger token budget would pad to)."""
  for b in buckets:
    if b >= num_tokens:
      return b
  b = buckets[0]
  while b < num_tokens:
    b *= 2
  return b


def _layer_params(m: ModelConfig) -> int:
  return m.d_model * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim + 3 * m.d_model * m.mlp_dim


def _kv_heads_per_chip(m: ModelConfig, tp: int) -> int:
  return math.ceil(m.num_kv_heads / tp)


def kv_pages_available(model: ModelConfig, device: Device, tp: int, page_size: int, *,
                       dtype_bytes: int = 2, kv_dtype_bytes: int | None = None,
                       token_budget: int = 512, max_seqs: int = 256) -> int:
  """The KV pool one replica of tp chips holds: EngineConfig.num_pages (the null page included)
  that fit in HBM_USABLE of its memory after the weights (sharded) and one step's activations and
  logits. 0 when even the weights do not fit."""
  if tp < 1 or page_size < 1:
    raise ValueError(f'kv_pages_available: tp={tp}, page_size={page_size}; both must be >= 1.')
  kv_bytes = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
  m = model
  weights = m.num_params() * dtype_bytes
  activations = token_budget * (4 * m.d_model * tp + 2 * (m.num_heads + 2 * m.num_kv_heads)
                                * m.head_dim + 2 * m.num_heads * m.head_dim + 6 * m.mlp_dim) * dtype_bytes
  logits = max_seqs * m.vocab_size * 4
  page = page_size * 2 * m.num_layers * _kv_heads_per_chip(m, tp) * tp * m.head_dim * kv_bytes
  free = tp * device.hbm_bytes * HBM_USABLE - weights - activations - logits
  return max(0, int(free // page))


@dataclasses.dataclass(frozen=True)
class RooflineModel:
  """A StepTimeModel for `model` on tp chips of `device` running an engine with config `engine`."""

  model: ModelConfig
  device: Device
  tp: int
  engine: EngineConfig
  dtype_bytes: int = 2
  kv_dtype_bytes: int | None = None  # None: dtype_bytes
  compute_efficiency: float = COMPUTE_EFFICIENCY
  memory_efficiency: float = MEMORY_EFFICIENCY
  host_overhead_s: float = HOST_OVERHEAD_S
  collective_latency_s: float = COLLECTIVE_LATENCY_S

  def __post_init__(self):
    if self.tp < 1:
      raise ValueError(f'RooflineModel: tp={self.tp}; use 1 or more chips.')
    for name in ('compute_efficiency', 'memory_efficiency'):
      if not 0 < getattr(self, name) <= 1:
        raise ValueError(f'RooflineModel.{name}={getattr(self, name)}; use a fraction in (0, 1].')

  def breakdown(self, shape: StepShape) -> dict[str, float]:
    """Seconds of each term: compute_s, memory_s, allreduce_s, host_s (see the module docstring)."""
    m, d, tp = self.model, self.device, self.tp
    L, D, V, N, K, H = (m.num_layers, m.d_model, m.vocab_size, m.num_heads, m.num_kv_heads,
                        m.head_dim)
    T = padded_tokens(shape.num_tokens, self.engine.buckets())
    attn_qk = sum(q * kv for q, kv in zip(shape.q_lens, shape.kv_lens))
    flops = 2 * T * L * _layer_params(m) + 2 * self.engine.max_seqs * D * V + 4 * L * N * H * attn_qk
    kv_bytes = self.dtype_bytes if self.kv_dtype_bytes is None else self.kv_dtype_bytes
    kv_per_token = 2 * L * _kv_heads_per_chip(m, tp) * H * kv_bytes
    weights = (L * _layer_params(m) + D * V) * self.dtype_bytes / tp
    kv = (sum(shape.kv_lens) + shape.num_tokens) * kv_per_token
    activations = T * L * (4 * D + (2 * (N + 2 * K) * H + 2 * N * H + 6 * m.mlp_dim) / tp) * self.dtype_bytes
    allreduce = 0.0
    if tp > 1:
      ring = 2 * (tp - 1) / tp * T * D * self.dtype_bytes / d.link_bytes_per_s
      allreduce = 2 * L * (ring + self.collective_latency_s)
    return dict(compute_s=flops / (tp * d.peak_flops * self.compute_efficiency),
                memory_s=(weights + kv + activations) / (d.hbm_bytes_per_s * self.memory_efficiency),
                allreduce_s=allreduce, host_s=self.host_overhead_s)

  def step_time_s(self, shape: StepShape) -> float:
    b = self.breakdown(shape)
    return max(b['compute_s'], b['memory_s']) + b['allreduce_s'] + b['host_s']
