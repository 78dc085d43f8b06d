"""The training loop: build the mesh and sharded state, compile once, step, log.

Host-side metrics lag one step: step N is dispatched before step N-1's metrics are read, so
the device never waits for the host to log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Iterable

import jax
import numpy as np
from tqdm import tqdm

from data.synthetic import Batch
from parallelism.mesh import make_mesh
from parallelism.rules import DEFAULT_RULES, Rules
from train import datasets
from train.config import TrainConfig
from train.evaluate import compile_eval_step, evaluate
from train.flops import total_peak_flops
from train.metrics import MetricsWriter
from train.optimizer import make_optimizer
from train.step import batch_spec, compile_train_step, init_train_state


def train(cfg: TrainConfig, workdir: str, batches: Iterable[Batch] | None = None,
          rules: Rules = DEFAULT_RULES, progress: bool = True) -> list[dict]:
  """Trains for `cfg.steps` steps; returns the logged metrics (also in <workdir>/metrics.jsonl).

  `batches` overrides cfg.data (tests); otherwise cfg.data.source decides, and validation runs
  every cfg.data.eval_every steps and after the last step.
  """
  os.makedirs(workdir, exist_ok=True)
  directory = datasets.data_dir(cfg) if batches is None else None
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2, default=str)
  mesh = make_mesh(cfg.mesh)
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  state, state_shardings = init_train_state(cfg, mesh, tx, rules)
  start = time.perf_counter()
  step_fn = compile_train_step(cfg, mesh, tx, state_shardings, rules)
  logging.info('Compiled the train step in %.1f s on mesh %s.', time.perf_counter() - start,
               dict(mesh.shape))
  shardings = {k: v.sharding for k, v in batch_spec(cfg, mesh, rules).items()}
  batches = iter(datasets.train_batches(cfg, directory) if batches is None else batches)
  eval_step = None
  if directory is not None and cfg.data.eval_every:
    eval_step = compile_eval_step(cfg, mesh, state_shardings.params, rules)
  flops_per_step = cfg.model.flops_per_token(cfg.seq_len) * cfg.tokens_per_step
  peak_flops = total_peak_flops(mesh.devices.flat)

  logged: list[dict] = []
  window: list[dict] = []  # per-step metrics since the last log line
  last_done = time.perf_counter()
  with MetricsWriter(workdir) as writer, tqdm(total=cfg.steps, disable=None if progress else True,
                                             unit='step', dynamic_ncols=True) as bar:

    def finish(step: int, metrics) -> None:
      nonlocal last_done
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for `step`
      now = time.perf_counter()
      values['step_time'] = now - last_done
      last_done = now
      window.append(values)
      bar.update(1)
      bar.set_postfix(loss=f"{values['loss']:.4f}")
      if (step + 1) % cfg.log_every and step + 1 != cfg.steps:
        return
      step_time = float(np.mean([w['step_time'] for w in window]))
      record = {
          'loss': values['loss'],
          'grad_norm': values['grad_norm'],
          'learning_rate': values['learning_rate'],
          'skipped_steps': values['skipped_steps'],
          'step_time': step_time,
          'tokens_per_sec': cfg.tokens_per_step / step_time,
          'mfu': flops_per_step / step_time / peak_flops,
      }
      writer.write(step + 1, record)
      logged.append({'step': step + 1, **record})
      window.clear()
      if progress:
        bar.write(f"step {step + 1:>6}  loss {record['loss']:.4f}  "
                  f"grad_norm {record['grad_norm']:.3f}  lr {record['learning_rate']:.2e}  "
                  f"{record['tokens_per_sec']:,.0f} tok/s  MFU {record['mfu']:.1%}")

    def validate(step: int) -> None:
      nonlocal last_done
      with datasets.validation_batches(cfg, directory) as val:
        record = evaluate(eval_step, state.params, val, shardings, cfg.data.eval_batches)
      writer.write(step, record)
      logged.append({'step': step, **record})
      if progress:
        bar.write(f"step {step:>6}  validation loss {record['val_loss']:.4f}  "
                  f"perplexity {record['val_perplexity']:.2f}  ({record['val_tokens']:,.0f} tokens)")
      last_done = time.perf_counter()  # evaluation time is not training step time

    pending = None
    try:
      for step in range(cfg.steps):
        host_batch = next(batches)
        batch = {k: jax.make_array_from_process_local_data(sharding, np.asarray(host_batch[k]))
                 for k, sharding in shardings.items()}
        state, metrics = step_fn(state, batch)
        if pending is not None:
          finish(*pending)
        pending = (step, metrics)
        if eval_step is not None and ((step + 1) % cfg.data.eval_every == 0 or
                                      step + 1 == cfg.steps):
          finish(*pending)
          pending = None
          validate(step + 1)
      if pending is not None:
        finish(*pending)
    finally:
      if hasattr(batches, 'close'):
        batches.close()
  return logged
