"""Helpers of the serving tests: a tiny trained-run workdir (a byte-level BPE tokenizer in a data
directory and a real training checkpoint, train/checkpoint.py's format: state with params and
optimizer state, config, of a 2-layer, width-64 model whose vocabulary covers the tokenizer), the
engine the server tests serve it with, and a long streamed completion to interrupt."""

from __future__ import annotations

import glob
import os
import threading

import httpx2 as httpx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import tokenizer as tokenizer_lib
from models import presets, transformer
from serve.engine import EngineConfig
from train import checkpoint, optimizer
from train import step as step_lib
from train.config import CheckpointConfig, DataConfig, TrainConfig

TOKENIZER_VOCAB = 300
MODEL = presets.preset('tiny', num_layers=2, d_model=64, vocab_size=320, num_heads=4, num_kv_heads=2,
                       head_dim=16, mlp_dim=128, dtype='float32')
# The serving tests' engine: context 128 tokens (16 pages of 8), 4 running slots; one compiled bucket.
ENGINE = EngineConfig(num_pages=64, page_size=8, max_seqs=4, max_pages_per_seq=16, token_budget=32,
                      min_bucket=32)


def random_params(cfg, seed: int = 0):
  """Host-drawn weights (std 1/sqrt(fan in), norm scales near 1): no per-shape init compiles."""
  _, state = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  fan_in = {'o_NHD': cfg.num_heads * cfg.head_dim, 'down_FD': cfg.mlp_dim}

  def draw(path, x):
    name = [k.key for k in path if isinstance(getattr(k, 'key', None), str)][-1]
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if name == 'scale':
      return jnp.asarray(1 + 0.1 * noise)
    return jnp.asarray(noise / np.sqrt(fan_in.get(name, cfg.d_model)))

  return jax.tree.map_with_path(draw, state)


def make_workdir(root: str, step: int = 7) -> str:
  """<root>/data/tokenizer.json and <root>/run/checkpoints/<step>; returns <root>/run."""
  data_dir = os.path.join(root, 'data')
  os.makedirs(data_dir, exist_ok=True)
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), 'json', '*.py')))
  texts = [open(f, encoding='utf-8').read() for f in files]
  tokenizer_lib.train_bpe(texts, TOKENIZER_VOCAB).save(os.path.join(data_dir, 'tokenizer.json'))
  cfg = TrainConfig(model=MODEL, data=DataConfig(source=data_dir), steps=10)
  tx = optimizer.make_optimizer(cfg.optimizer, cfg.steps)
  params = random_params(MODEL)
  state = step_lib.TrainState(jnp.asarray(step, jnp.int32), params, jax.jit(tx.init)(params))
  workdir = os.path.join(root, 'run')
  ckpt = checkpoint.Checkpoints(workdir, CheckpointConfig(async_save=False), cfg, 'gin text')
  ckpt.save(step, state, None, wait=True)
  ckpt.close()
  return workdir


def long_stream(url: str, headers: dict | None = None, max_tokens: int = 120):
  """Starts streaming a `max_tokens` completion from the server at `url` in a thread, once its
  first event has arrived; returns (thread, events): the non-empty SSE lines, appended as they come."""
  events, first = [], threading.Event()

  def stream():
    body = {'model': 'run', 'prompt': 'z', 'max_tokens': max_tokens, 'stream': True,
            'ignore_eos': True}
    with httpx.stream('POST', url + '/v1/completions', json=body, headers=headers, timeout=60) as r:
      for line in r.iter_lines():
        if line:
          events.append(line)
          first.set()

  thread = threading.Thread(target=stream)
  thread.start()
  assert first.wait(30), 'no event streamed within 30 s'
  return thread, events
