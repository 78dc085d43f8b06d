"""The training schema. gin binds these frozen dataclasses in configs/*.gin (see configs/)."""

from __future__ import annotations

import dataclasses

from models.config import ModelConfig
from parallelism.mesh import MeshConfig


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with global-norm clipping and a linear-warmup + cosine-decay schedule."""

  learning_rate: float = 3e-4  # peak
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0  # <= 0 disables clipping

  def __post_init__(self):
    if self.learning_rate <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f'OptimizerConfig: need learning_rate > 0, warmup_steps >= 0 and '
                       f'0 <= min_lr_ratio <= 1; got {self}.')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where batches come from, and how often the validation split is evaluated.

  source: 'synthetic' (data/synthetic.py), 'stdlib' (the running Python's standard library,
  prepared on first use into <cache_dir>/stdlib-v<model vocab>), or a `stoker prepare` directory.
  """

  source: str = 'synthetic'
  cache_dir: str = '~/.cache/stoker/data'
  eval_every: int = 0  # steps between validation runs; 0: never
  eval_batches: int = 0  # global batches per validation run; 0: the whole split
  worker_count: int = 0  # Grain worker processes (0: read in the training process)

  def __post_init__(self):
    if self.eval_every < 0 or self.eval_batches < 0 or self.worker_count < 0:
      raise ValueError(f'data.eval_every, data.eval_batches and data.worker_count must be >= 0; '
                       f'got {self}.')
    if self.eval_every and self.source == 'synthetic':
      raise ValueError("data.eval_every needs a validation split: set data.source to 'stdlib' or "
                       'a `stoker prepare` directory.')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. `batch_size` is global (sequences per optimizer step)."""

  model: ModelConfig
  mesh: MeshConfig = MeshConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  steps: int = 100
  batch_size: int = 16
  seq_len: int = 128
  microbatches: int = 1  # gradient accumulation: the batch is split into this many parts
  z_loss: float = 0.0  # weight of log(Z)^2, keeps the softmax normaliser near 1
  seed: int = 0
  log_every: int = 10

  def __post_init__(self):
    for name in ('steps', 'batch_size', 'seq_len', 'microbatches', 'log_every'):
      if getattr(self, name) <= 0:
        raise ValueError(f'train.{name} must be positive, got {getattr(self, name)}.')
    if self.batch_size % self.microbatches:
      raise ValueError(f'train.batch_size ({self.batch_size}) must be a multiple of '
                       f'train.microbatches ({self.microbatches}).')

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len
