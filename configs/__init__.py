"""gin bindings for Stoker's config schema, and where the shipped .gin files live.

gin binds only these top-level constructors; library code takes the resulting frozen dataclasses:
  train(...)      -> train.config.TrainConfig
  model(name, **overrides) -> models.presets.preset: a named preset with fields replaced
  mesh(...)       -> parallelism.mesh.MeshConfig
  optimizer(...)  -> train.config.OptimizerConfig
  data(...)       -> train.config.DataConfig
  checkpoint(...) -> train.config.CheckpointConfig
  fault(...)      -> train.config.FaultConfig (fault injection for tests and drills)
  distill(...)    -> train.config.DistillConfig (distillation from a teacher; train/distill.py)
  lora(...)       -> models.lora.LoRAConfig (LoRA fine-tuning of lora.base; train/finetune.py)
  dpo(...)        -> train.config.DPOConfig (preference optimisation; train/dpo.py)
  engine(...)     -> serve.engine.EngineConfig (`stoker serve`: pages, slots, token budget, buckets)
  server(...)     -> serve.server.ServerConfig (`stoker serve`: host, port, queue bound, deadlines)
"""

from __future__ import annotations

import os
from typing import Sequence

import gin

from models.lora import LoRAConfig
from models.presets import preset
from parallelism.mesh import MeshConfig
from serve.engine import EngineConfig
from serve.server import ServerConfig
from train.config import (CheckpointConfig, DataConfig, DistillConfig, DPOConfig, FaultConfig,
                          OptimizerConfig, TrainConfig)

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))

train = gin.external_configurable(TrainConfig, 'train')
model = gin.external_configurable(preset, 'model')
mesh = gin.external_configurable(MeshConfig, 'mesh')
optimizer = gin.external_configurable(OptimizerConfig, 'optimizer')
data = gin.external_configurable(DataConfig, 'data')
checkpoint = gin.external_configurable(CheckpointConfig, 'checkpoint')
fault = gin.external_configurable(FaultConfig, 'fault')
distill = gin.external_configurable(DistillConfig, 'distill')
lora = gin.external_configurable(LoRAConfig, 'lora')
dpo = gin.external_configurable(DPOConfig, 'dpo')
engine = gin.external_configurable(EngineConfig, 'engine')
server = gin.external_configurable(ServerConfig, 'server')

gin.add_config_file_search_path(CONFIG_DIR)


def resolve(path: str) -> str:
  """A gin file given as a path, or relative to the shipped configs/ folder."""
  for candidate in (path, os.path.join(CONFIG_DIR, path),
                    os.path.join(CONFIG_DIR, os.path.relpath(path, 'configs'))):
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f'gin file {path!r} not found (looked in the current directory and '
                          f'{CONFIG_DIR}).')


def all_gin_files() -> list[str]:
  return sorted(os.path.join(root, name) for root, _, names in os.walk(CONFIG_DIR)
                for name in names if name.endswith('.gin'))


def load_train_config(gin_files: Sequence[str] = (), gin_params: Sequence[str] = ()) -> TrainConfig:
  """Parses gin files and bindings (later ones win) and builds the TrainConfig they describe."""
  gin.clear_config()
  # Sections a gin file leaves out still read their own bindings (`checkpoint.every_steps = 10`).
  gin.parse_config([f'train.{name} = @{name}()' for name in ('checkpoint', 'fault', 'distill', 'lora', 'dpo')])
  gin.parse_config_files_and_bindings([resolve(f) for f in gin_files], list(gin_params),
                                      finalize_config=False)
  return train()


def load_serve_config(gin_files: Sequence[str] = (), gin_params: Sequence[str] = ()
                      ) -> tuple[EngineConfig, ServerConfig]:
  """Parses gin files and bindings of `engine.*` and `server.*` into the serving configs."""
  gin.clear_config()
  gin.parse_config_files_and_bindings([resolve(f) for f in gin_files], list(gin_params),
                                      finalize_config=False)
  return engine(), server()
