"""A supervised warm start on the task's solved examples (rl/tasks.py's sft.jsonl), trained by the
training loop (train/loop.py) into an ordinary training workdir that `rl.init` names.

GRPO learns only from groups whose rewards differ, so it starts from a policy that sometimes gets
the answer right. Each example is one row: "47+38= 85" then the end of text, padded; the loss
covers the completion (" 85" and the end) only, what RL will sample.
"""

from __future__ import annotations

import json

import numpy as np

from models.config import ModelConfig
from parallelism.mesh import MeshConfig
from train import loop
from train.config import CheckpointConfig, OptimizerConfig, TrainConfig


class Examples:
  """Batches of solved sums, drawn with replacement from (seed, batch index): an iterator that
  keeps its place across train() calls in one process (resuming a workdir with more steps)."""

  def __init__(self, path: str, tokenizer, batch_size: int, seq_len: int, seed: int = 0):
    with open(path) as f:
      texts = [json.loads(line)['text'] for line in f if line.strip()]
    eos = tokenizer.token_to_id('<|endoftext|>')
    self.rows = []
    for text in texts:
      prompt, answer = text.split('=', 1)
      p = tokenizer.encode(prompt + '=', add_special_tokens=False).ids
      c = tokenizer.encode(answer, add_special_tokens=False).ids + [eos]
      if len(p) + len(c) > seq_len:
        raise ValueError(f'{text!r} is {len(p) + len(c)} tokens; raise seq_len to hold it.')
      self.rows.append((p, c))
    self.batch_size, self.seq_len, self.seed, self.index = batch_size, seq_len, seed, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    B, T = self.batch_size, self.seq_len
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    batch = {k: np.zeros((B, T), np.float32 if k == 'loss_mask' else np.int32)
             for k in ('inputs', 'targets', 'loss_mask', 'segment_ids')}
    batch['positions'] = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    for b, i in enumerate(rng.integers(0, len(self.rows), B)):
      p, c = self.rows[i]
      ids = p + c
      batch['inputs'][b, :len(ids)] = ids
      batch['targets'][b, :len(ids) - 1] = ids[1:]
      batch['loss_mask'][b, len(p) - 1:len(ids) - 1] = 1.0
      batch['segment_ids'][b, :] = 1
    return batch


def config(model: ModelConfig, steps: int, *, batch_size: int = 64, seq_len: int = 16,
           learning_rate: float = 1e-3, seed: int = 0, mesh: MeshConfig = MeshConfig()
           ) -> TrainConfig:
  """A constant learning rate (after 10 warmup steps), so that a run continued to more steps is
  the run that would have gone there at once."""
  return TrainConfig(model=model, mesh=mesh, steps=steps, batch_size=batch_size, seq_len=seq_len,
                     seed=seed, log_every=max(1, steps // 10),
                     optimizer=OptimizerConfig(learning_rate=learning_rate, warmup_steps=10,
                                               min_lr_ratio=1.0, weight_decay=0.0),
                     checkpoint=CheckpointConfig(every_steps=0, keep=20, async_save=False))


def train(cfg: TrainConfig, workdir: str, examples: Examples) -> list[dict]:
  """Trains (or continues) the warm start in `workdir` up to cfg.steps."""
  return loop.train(cfg, workdir, batches=examples, progress=False)
