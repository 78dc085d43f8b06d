"""`stoker serve`: load a training checkpoint or a Hugging Face directory onto the serving mesh
and run the OpenAI-compatible server (serve/server.py) until it is stopped."""

from __future__ import annotations

import dataclasses

from parallelism.compile_cache import use_compilation_cache
from serve import loader, lora_flags, server
from serve.engine import EngineConfig


def serve_command(engine_cfg: EngineConfig, server_cfg: server.ServerConfig, *,
                  checkpoint: str | None = None, hf_dir: str | None = None, step: int | None = None,
                  tokenizer: str | None = None, tensor_parallel: int = 1, loras=(),
                  max_loras: int | None = None, max_lora_rank: int | None = None) -> int:
  """Serves `checkpoint` (a workdir, its checkpoints/ or a step folder) or `hf_dir`; returns the
  exit code. A bad source fails before a port is bound. `loras`: (name, path) LoRA adapters served
  beside the base (serve/lora.py) in max_loras device slots of rank max_lora_rank."""
  engine_cfg = dataclasses.replace(
      engine_cfg, max_loras=lora_flags.slots(loras, max_loras, engine_cfg.max_loras),
      max_lora_rank=max_lora_rank or engine_cfg.max_lora_rank)
  if engine_cfg.compilation_cache_dir is None:
    use_compilation_cache()
  mesh = loader.serving_mesh(tensor_parallel)
  loader.check_source(checkpoint, hf_dir, step)
  loader.check_adapters(loras, server_cfg.model_name)
  if checkpoint:
    load = lambda: loader.load_checkpoint(checkpoint, engine_cfg, step=step, mesh=mesh,
                                          tokenizer=tokenizer, loras=loras)
  else:
    load = lambda: loader.load_hf(hf_dir, engine_cfg, mesh=mesh, tokenizer=tokenizer, loras=loras)
  return server.serve(server.Service(server_cfg, load))
