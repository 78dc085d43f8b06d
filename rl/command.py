"""`stoker rl`: its flags, and the run as a job (multi-process start-up, the compilation cache, the
loop, a summary, the exit code a supervisor acts on, as `stoker train`). Several processes:
`stoker launch --local-processes N -- rl ...` on one machine, or the STOKER_* variables of
parallelism/distributed.py (rl/processes.py: what each process samples and trains)."""

from __future__ import annotations

import os
import sys

RL_GIN = 'rl/addition_tiny.gin'


def add_arguments(parser) -> None:
  parser.add_argument('--gin_file', action='append', default=[],
                      help=f'A gin file (path, or relative to configs/) binding rl.*; repeatable '
                           f'(default {RL_GIN}).')
  parser.add_argument('--gin_param', action='append', default=[],
                      help="A gin binding such as 'rl.steps=30'; repeatable, applied last.")
  parser.add_argument('--workdir', required=True,
                      help='Where checkpoints and metrics.jsonl go; a workdir with checkpoints is resumed.')


def command(args, argv) -> int:
  """Runs `stoker rl` from parsed flags; returns the exit code."""
  del argv
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from parallelism.compile_cache import use_compilation_cache  # pylint: disable=g-import-not-at-top
  from rl import loop  # pylint: disable=g-import-not-at-top
  from rl.config import load_rl_config  # pylint: disable=g-import-not-at-top
  from train import faults  # pylint: disable=g-import-not-at-top
  from train.command import exit_failed_job, join_job  # pylint: disable=g-import-not-at-top
  cfg = load_rl_config(args.gin_file or [RL_GIN], args.gin_param)
  join_job(cfg.checkpoint)
  use_compilation_cache()
  try:
    logged = loop.train(cfg, args.workdir, gin.config_str())
  except faults.TrainingInterrupted as e:
    print(f'stoker rl: {e} Exit code {e.exit_code}; run the same command again to resume.',
          file=sys.stderr)
    return e.exit_code
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    exit_failed_job()
  if jax.process_index():  # process 0 reports
    return 0
  steps = [r for r in logged if 'reward_mean' in r]
  if not steps:
    print(f'Nothing to do: {args.workdir} already holds the checkpoint of step {cfg.steps}.')
    return 0
  evals = [r for r in logged if any(k.startswith('eval_') for k in r)]
  summary = ''
  if evals:
    first, last = evals[0], evals[-1]
    summary = ', held-out ' + ', '.join(f'{k[5:]} {first[k]:.3f} -> {last[k]:.3f}'
                                        for k in last if k.startswith('eval_') and k in first)
  print(f'Ran {len(steps)} GRPO steps: reward {steps[0]["reward_mean"]:.3f} -> '
        f'{steps[-1]["reward_mean"]:.3f}{summary}. Metrics: '
        f'{os.path.join(args.workdir, "metrics.jsonl")}')
  return 0
