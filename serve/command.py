"""`stoker serve`: load a training checkpoint or a Hugging Face directory onto the serving mesh
and run the OpenAI-compatible server (serve/server.py) until it is stopped."""

from __future__ import annotations

from parallelism.compile_cache import use_compilation_cache
from serve import loader, server
from serve.engine import EngineConfig


def serve_command(engine_cfg: EngineConfig, server_cfg: server.ServerConfig, *,
                  checkpoint: str | None = None, hf_dir: str | None = None, step: int | None = None,
                  tokenizer: str | None = None, tensor_parallel: int = 1) -> int:
  """Serves `checkpoint` (a workdir, its checkpoints/ or a step folder) or `hf_dir`; returns the
  exit code. A bad source fails before a port is bound."""
  if engine_cfg.compilation_cache_dir is None:
    use_compilation_cache()
  mesh = loader.serving_mesh(tensor_parallel)
  loader.check_source(checkpoint, hf_dir, step)
  if checkpoint:
    load = lambda: loader.load_checkpoint(checkpoint, engine_cfg, step=step, mesh=mesh,
                                          tokenizer=tokenizer)
  else:
    load = lambda: loader.load_hf(hf_dir, engine_cfg, mesh=mesh, tokenizer=tokenizer)
  return server.serve(server.Service(server_cfg, load))
