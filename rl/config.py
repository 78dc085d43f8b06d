"""The `stoker rl` schema: one frozen dataclass bound by `rl.*` in gin (configs/rl/*.gin).

The sections it shares with training and serving (model, mesh, optimizer, engine, checkpoint,
fault) are the same dataclasses, bound by the same gin names (configs/__init__.py).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import gin

import configs
from models.config import ModelConfig
from models.lora import LoRAConfig
from parallelism.mesh import MeshConfig
from rl import grpo
from serve.engine import EngineConfig
from train.config import CheckpointConfig, FaultConfig, OptimizerConfig


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """One GRPO run (rl/loop.py). Each step samples `group_size` completions for each of
  `prompts_per_step` prompts and takes `minibatches` optimizer steps on them."""

  model: ModelConfig
  task_dir: str = ''  # rl/tasks.write_task's files; '' writes the addition task to <workdir>/task
  init: str = ''  # the policy to start from: a training workdir or a Hugging Face directory ('': random)
  reward_fns: tuple[str, ...] = ('exact_answer', 'answer_format')  # rl/rewards.py names
  reward_weights: tuple[float, ...] = ()  # the advantage's reward is their weighted sum; (): all 1
  steps: int = 100
  prompts_per_step: int = 16
  group_size: int = 8
  minibatches: int = 1  # optimizer steps per batch of samples (each on a slice of the groups)
  max_tokens: int = 8  # completion tokens per sample
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  normalisation: str = 'sequence'  # rl/grpo.py: 'sequence' (GRPO), 'token' (DAPO), 'constant' (Dr. GRPO)
  scale_std: bool = True  # advantages divided by the group's std (False: Dr. GRPO)
  eps_low: float = 0.2
  eps_high: float = 0.2
  beta: float = 0.0  # weight of the k3 KL penalty to the reference (the initial policy); 0: none
  seq_len: int = 32  # the trainer's padded sequence length (prompt + completion)
  eval_every: int = 0  # held-out greedy exact-answer accuracy every this many steps; 0: never
  eval_prompts: int = 0  # held-out prompts evaluated; 0: all
  seed: int = 0
  devices: int = 0  # the training mesh spans the first this many devices (0: all); engines: rl/processes.py
  mesh: MeshConfig = MeshConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  engine: EngineConfig = EngineConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  fault: FaultConfig = FaultConfig()
  lora: LoRAConfig = LoRAConfig()  # with lora.base: train adapters over that base (rl.init unused)

  def __post_init__(self):
    object.__setattr__(self, 'reward_fns', tuple(self.reward_fns))
    object.__setattr__(self, 'reward_weights', tuple(float(w) for w in self.reward_weights))
    for name in ('steps', 'prompts_per_step', 'group_size', 'minibatches', 'max_tokens', 'seq_len'):
      if getattr(self, name) <= 0:
        raise ValueError(f'rl.{name} must be positive, got {getattr(self, name)}.')
    if self.group_size < 2:
      raise ValueError(f'rl.group_size={self.group_size}: a group needs 2 or more completions, or '
                       'every advantage is 0.')
    if self.prompts_per_step % self.minibatches:
      raise ValueError(f'rl.prompts_per_step ({self.prompts_per_step}) must be a multiple of '
                       f'rl.minibatches ({self.minibatches}): each mini-batch holds whole groups.')
    if self.normalisation not in grpo.NORMALISATIONS:
      raise ValueError(f'rl.normalisation={self.normalisation!r}; use one of {grpo.NORMALISATIONS}.')
    if self.reward_weights and len(self.reward_weights) != len(self.reward_fns):
      raise ValueError(f'rl.reward_weights has {len(self.reward_weights)} weights for '
                       f'{len(self.reward_fns)} reward_fns; give one per function, or none.')
    if not self.reward_fns:
      raise ValueError('rl.reward_fns is empty; name at least one reward (rl/rewards.py).')
    if min(self.beta, self.eps_low, self.eps_high, self.eval_every, self.devices) < 0:
      raise ValueError(f'rl: need beta, eps_low, eps_high, eval_every and devices >= 0; got {self}.')
    if self.engine.max_seqs < self.group_size:
      raise ValueError(f'rl.engine.max_seqs ({self.engine.max_seqs}) < rl.group_size '
                       f'({self.group_size}): raise engine.max_seqs so a group samples together.')
    if self.lora.base and (self.init or self.lora.base_dtype or self.lora.dropout):
      raise ValueError(f'rl with lora.base={self.lora.base!r}: the base is the initial policy, so leave '
                       'rl.init empty; lora.base_dtype and lora.dropout are not supported in rl yet.')

  @property
  def samples_per_step(self) -> int:
    return self.prompts_per_step * self.group_size

  @property
  def weights(self) -> tuple[float, ...]:
    return self.reward_weights or (1.0,) * len(self.reward_fns)


rl = gin.external_configurable(RLConfig, 'rl')
SECTIONS = ('mesh', 'optimizer', 'engine', 'checkpoint', 'fault', 'lora')


def load_rl_config(gin_files: Sequence[str] = (), gin_params: Sequence[str] = ()) -> RLConfig:
  """Parses gin files and bindings (later ones win) into the RLConfig they describe."""
  gin.clear_config()
  # Sections a gin file leaves out still read their own bindings (`checkpoint.every_steps = 10`).
  gin.parse_config([f'rl.{name} = @{name}()' for name in SECTIONS])
  gin.parse_config_files_and_bindings([configs.resolve(f) for f in gin_files], list(gin_params),
                                      finalize_config=False)
  return rl()
