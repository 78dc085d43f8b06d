"""The training schema. gin binds these frozen dataclasses in configs/*.gin (see configs/)."""

from __future__ import annotations

import dataclasses

from models.config import ModelConfig
from models.lora import LoRAConfig
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
class CheckpointConfig:
  """Periodic Orbax checkpoints in <workdir>/checkpoints, and just-in-time saves on failure.

  A run started on a workdir with checkpoints resumes from the newest complete one. See
  train/checkpoint.py and train/faults.py (and the README) for the just-in-time design.
  """

  every_steps: int = 0  # periodic saves; 0: none (the end of training and failures still save)
  keep: int = 3  # newest checkpoints kept
  async_save: bool = True  # periodic saves write in the background while training goes on
  just_in_time: bool = True  # keep the pre-step state reachable and save it on failure
  hang_timeout_s: float = 600.0  # a step (or batch fetch) running longer is a hang; 0: no watchdog
  max_nonfinite_steps: int = 5  # more consecutive skipped (non-finite) steps roll back
  max_rollbacks: int = 3  # non-finite rollbacks per run before giving up (exit code 83)

  def __post_init__(self):
    if self.every_steps < 0 or self.keep < 1 or self.hang_timeout_s < 0 or self.max_rollbacks < 0:
      raise ValueError(f'checkpoint: need every_steps >= 0, keep >= 1, hang_timeout_s >= 0 and '
                       f'max_rollbacks >= 0; got {self}.')
    if self.max_nonfinite_steps < 1:
      raise ValueError(f'checkpoint.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}.')


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Knowledge distillation from a frozen teacher (train/distill.py); off while `teacher` is ''.

  The loss is alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, both summed
  over the target tokens the loss mask keeps; top_k > 0 compares the two distributions on the
  teacher's k most likely tokens only.
  """

  teacher: str = ''  # a Stoker training workdir (its newest checkpoint) or a Hugging Face directory
  teacher_dtype: str = ''  # '' as stored; 'int8': int8 weights, W8A8 products (models/quant.py)
  alpha: float = 0.5
  temperature: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if not 0 <= self.alpha <= 1 or self.temperature <= 0 or self.top_k < 0:
      raise ValueError(f'distill: need 0 <= alpha <= 1, temperature > 0 and top_k >= 0; got {self}.')
    if self.teacher_dtype not in ('', 'int8'):
      raise ValueError(f"distill.teacher_dtype must be '' (the teacher as stored) or 'int8'; got "
                       f'{self.teacher_dtype!r}.')


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """Direct preference optimisation (train/dpo.py) on a `stoker prepare --format preference` dataset;
  off while beta is 0. The reference is the LoRA base with the adapters off (lora.base), or with
  full fine-tuning a frozen copy read from `reference` (a workdir or a Hugging Face directory)."""

  beta: float = 0.0
  label_smoothing: float = 0.0
  reference: str = ''

  def __post_init__(self):
    if self.beta < 0 or not 0 <= self.label_smoothing < 0.5:
      raise ValueError(f'dpo: need beta >= 0 (0: off) and 0 <= label_smoothing < 0.5; got {self}.')


FAULT_KINDS = ('none', 'exception', 'sigterm', 'sigkill', 'hang', 'nonfinite', 'kill_in_save')


@dataclasses.dataclass(frozen=True)
class FaultConfig:
  """Fault injection, for tests and drills: fire `kind` once at `step`.

  exception: a RuntimeError surfaces while step `step`'s gradients are awaited (as a device error
  would); sigterm: the process sends itself SIGTERM during the step; hang: the step never
  returns (the watchdog must act); nonfinite: `count` steps from `step` get NaN gradients;
  sigkill: the process dies at once (in a multi-process job, set `process` to kill one of them);
  kill_in_save: SIGKILL in the middle of writing the checkpoint of step `step`.
  A fault fires only in a run that starts from scratch, so a resumed run does not repeat it.
  """

  kind: str = 'none'
  step: int = 0
  count: int = 1
  process: int = -1  # the process it happens in; -1: every process

  def __post_init__(self):
    if self.kind not in FAULT_KINDS:
      raise ValueError(f'fault.kind must be one of {FAULT_KINDS}, got {self.kind!r}.')
    if self.step < 0 or self.count < 1:
      raise ValueError(f'fault: need step >= 0 and count >= 1; got {self}.')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. `batch_size` is global (sequences per optimizer step)."""

  model: ModelConfig
  mesh: MeshConfig = MeshConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  fault: FaultConfig = FaultConfig()
  distill: DistillConfig = DistillConfig()
  lora: LoRAConfig = LoRAConfig()  # with lora.base set: LoRA fine-tuning (train/finetune.py)
  dpo: DPOConfig = DPOConfig()  # with dpo.beta > 0: DPO on preference pairs (train/dpo.py)
  steps: int = 100
  batch_size: int = 16
  seq_len: int = 128
  microbatches: int = 1  # gradient accumulation: the batch is split into this many parts
  z_loss: float = 0.0  # weight of log(Z)^2, keeps the softmax normaliser near 1
  seed: int = 0
  log_every: int = 10
  monitoring_port: int = 0  # > 0: process 0 serves Prometheus metrics here (train/monitoring.py)
  monitoring_host: str = '127.0.0.1'  # the exporter's address: this machine only; '0.0.0.0' to be scraped

  def __post_init__(self):
    if not 0 <= self.monitoring_port < 65536:
      raise ValueError(f'train.monitoring_port must be in 0..65535 (0: off), got {self.monitoring_port}.')
    for name in ('steps', 'batch_size', 'seq_len', 'microbatches', 'log_every'):
      if getattr(self, name) <= 0:
        raise ValueError(f'train.{name} must be positive, got {getattr(self, name)}.')
    if self.batch_size % self.microbatches:
      raise ValueError(f'train.batch_size ({self.batch_size}) must be a multiple of '
                       f'train.microbatches ({self.microbatches}).')
    if self.dpo.beta and self.batch_size % (2 * self.microbatches):
      raise ValueError(f'with DPO, train.batch_size ({self.batch_size}) counts the chosen and the '
                       'rejected sequence of each pair: it must be a multiple of 2 x train.microbatches '
                       f'({self.microbatches}), so that every microbatch holds whole pairs.')
    if self.dpo.beta and not (self.lora.base or self.dpo.reference):
      raise ValueError('DPO needs a reference model: fine-tune with LoRA (lora.base; the reference is '
                       'the base) or name a frozen copy with dpo.reference.')

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len
