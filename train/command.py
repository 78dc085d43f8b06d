"""`stoker train` as a job: multi-process start-up, the compilation cache, training, a one-line
summary, and the exit code a supervisor (train/supervise.py) acts on."""

from __future__ import annotations

import logging
import os
import sys

import jax

import storage
from parallelism import distributed
from parallelism.compile_cache import use_compilation_cache
from train import distill, faults, loop
from train.config import CheckpointConfig, TrainConfig


def train_command(cfg: TrainConfig, workdir: str, config_text: str = '') -> int:
  """Trains `cfg` in `workdir` (resuming it) and prints the outcome; returns the exit code."""
  storage.check(workdir, write=True)  # an unusable bucket fails at once, before JAX starts its devices
  join_job(cfg.checkpoint)
  use_compilation_cache()
  distill.validate(cfg)  # a teacher that cannot teach this student fails before anything is written
  try:
    logged = loop.train(cfg, workdir, config_text=config_text)
  except faults.TrainingInterrupted as e:
    print(f'stoker train: {e} Exit code {e.exit_code}; run the same command again to resume.',
          file=sys.stderr)
    return e.exit_code
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    exit_failed_job()
  losses = [r['loss'] for r in logged if 'loss' in r]
  if not losses:
    print(f'Nothing to train: {workdir} already holds the checkpoint of step {cfg.steps}.')
    return 0
  validation = [r['val_perplexity'] for r in logged if 'val_perplexity' in r]
  summary = f', validation perplexity {validation[-1]:.2f}' if validation else ''
  print(f'Trained {cfg.steps} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}{summary}. '
        f'Metrics: {storage.join(workdir, "metrics.jsonl")}; '
        f'TensorBoard: tensorboard --logdir {storage.join(workdir, "tensorboard")}')
  return 0


def join_job(checkpoint: CheckpointConfig) -> None:
  """Joins the job the environment describes (parallelism/distributed.py), before anything touches
  a device (`stoker train` and `stoker rl`)."""
  # The coordination service ends every process some time after one dies; give the survivors'
  # watchdog time to notice the stall (even in a save) and save first. (It ended them 55-90 s
  # after a death with the default 100 s.)
  watchdog_limit = max(60, faults.PAUSED_SLACK * checkpoint.hang_timeout_s)
  distributed.initialize(distributed.from_env(), heartbeat_timeout_s=int(2 * watchdog_limit + 60))


def exit_failed_job() -> None:
  """Ends this process of a multi-process job whose step raised, at once (from an except block)."""
  # A collective that failed usually means a peer died; JAX's shutdown barrier would wait for it
  # until the heartbeat timeout. The supervisor restarts from the newest checkpoint.
  logging.exception('Step failed in a multi-process job; exiting at once.')
  logging.shutdown()
  os._exit(faults.EXIT_STEP_FAILED)  # pylint: disable=protected-access
