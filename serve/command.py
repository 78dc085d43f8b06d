"""`stoker serve`: load a training checkpoint or a Hugging Face directory onto the serving mesh
and run the OpenAI-compatible server (serve/server.py) until it is stopped. With a draft model
(--draft-checkpoint, --draft-hf-dir) or --speculative ngram it decodes speculatively
(serve/speculative.py)."""

from __future__ import annotations

import dataclasses

from models import checkpoint_io
from parallelism.compile_cache import use_compilation_cache
from serve import loader, lora_flags, server
from serve import speculative as speculative_lib
from serve.engine import EngineConfig

DEFAULT_SPECULATIVE_TOKENS = 4  # k when a drafter is given without --num-speculative-tokens


def serve_command(engine_cfg: EngineConfig, server_cfg: server.ServerConfig, *,
                  checkpoint: str | None = None, hf_dir: str | None = None, step: int | None = None,
                  tokenizer: str | None = None, tensor_parallel: int = 1, loras=(),
                  max_loras: int | None = None, max_lora_rank: int | None = None,
                  draft_checkpoint: str | None = None, draft_hf_dir: str | None = None,
                  speculative: str | None = None, num_speculative_tokens: int | None = None,
                  speculative_max_batch: int | None = None, draft_weight_dtype: str | None = 'auto') -> int:
  """Serves `checkpoint` (a workdir, its checkpoints/ or a step folder) or `hf_dir`; returns the
  exit code. A bad source fails before a port is bound. `loras`: (name, path) LoRA adapters served
  beside the base (serve/lora.py) in max_loras device slots of rank max_lora_rank. A draft model
  (draft_checkpoint or draft_hf_dir) or speculative='ngram' turns on speculative decoding with k =
  num_speculative_tokens, its weights in draft_weight_dtype (speculative.draft_engine_config); a drafter
  of another vocabulary, or a bad k, fails before binding too."""
  engine_cfg = dataclasses.replace(
      engine_cfg, max_loras=lora_flags.slots(loras, max_loras, engine_cfg.max_loras),
      max_lora_rank=max_lora_rank or engine_cfg.max_lora_rank)
  engine_cfg = speculative_config(engine_cfg, draft_checkpoint or draft_hf_dir, speculative,
                                  num_speculative_tokens, speculative_max_batch)
  if engine_cfg.compilation_cache_dir is None:
    use_compilation_cache()
  mesh = loader.serving_mesh(tensor_parallel)
  loader.check_source(checkpoint, hf_dir, step)
  loader.check_adapters(loras, server_cfg.model_name)
  if draft_checkpoint or draft_hf_dir:
    check_drafter(checkpoint or hf_dir, draft_checkpoint, draft_hf_dir, step)
  load = make_load(engine_cfg, checkpoint=checkpoint, hf_dir=hf_dir, step=step, mesh=mesh,
                   tokenizer=tokenizer, loras=loras, draft_checkpoint=draft_checkpoint,
                   draft_hf_dir=draft_hf_dir, draft_weight_dtype=draft_weight_dtype)
  return server.serve(server.Service(server_cfg, load))


def make_load(engine_cfg: EngineConfig, *, checkpoint: str | None = None, hf_dir: str | None = None,
              step: int | None = None, mesh=None, tokenizer: str | None = None, loras=(),
              draft_checkpoint: str | None = None, draft_hf_dir: str | None = None,
              draft_weight_dtype: str | None = 'auto'):
  """The server's load function: the served model's Engine, with its draft model attached if given."""

  def load():
    if checkpoint:
      loaded = loader.load_checkpoint(checkpoint, engine_cfg, step=step, mesh=mesh, tokenizer=tokenizer,
                                      loras=loras)
    else:
      loaded = loader.load_hf(hf_dir, engine_cfg, mesh=mesh, tokenizer=tokenizer, loras=loras)
    if draft_checkpoint or draft_hf_dir:
      draft_cfg = speculative_lib.draft_engine_config(engine_cfg, draft_weight_dtype)
      if draft_checkpoint:
        draft = loader.load_checkpoint(draft_checkpoint, draft_cfg, mesh=mesh, tokenizer=tokenizer)
      else:
        draft = loader.load_hf(draft_hf_dir, draft_cfg, mesh=mesh, tokenizer=tokenizer)
      loaded.engine.attach_drafter(draft.engine)
    return loaded
  return load


def speculative_config(engine_cfg: EngineConfig, draft: str | None, ngram: str | None,
                       k: int | None, max_batch: int | None) -> EngineConfig:
  """engine_cfg with the speculative decoding flags applied (EngineConfig validates them)."""
  mode = 'draft' if draft else ngram or engine_cfg.speculative
  if k is not None and mode is None:
    raise ValueError(f'--num-speculative-tokens {k} without a drafter; add --draft-checkpoint D, '
                     '--draft-hf-dir D or --speculative ngram.')
  if mode is None:
    return engine_cfg
  k = k if k is not None else engine_cfg.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS
  return dataclasses.replace(engine_cfg, speculative=mode, num_speculative_tokens=k,
                             speculative_max_batch=max_batch or engine_cfg.speculative_max_batch)


def check_drafter(target: str, draft_checkpoint: str | None, draft_hf_dir: str | None,
                  step: int | None) -> None:
  """Fails now, naming both, if the draft model is missing or has another vocabulary than the target."""
  loader.check_source(draft_checkpoint, draft_hf_dir)
  vocab = checkpoint_io.read_config(target).vocab_size if step is None else (
      checkpoint_io.read_model_config(target, step).vocab_size)
  draft = draft_checkpoint or draft_hf_dir
  draft_vocab = checkpoint_io.read_config(draft).vocab_size
  if draft_vocab != vocab:
    raise ValueError(f'the draft model {draft} has a vocabulary of {draft_vocab} tokens, the served model '
                     f'{vocab}: a drafter must share the served model\'s tokenizer (e.g. a student distilled '
                     'from it with stoker distill).')
