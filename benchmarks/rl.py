"""GRPO learns two-digit addition with the serving engine in the loop (issue 27, acceptance 3 and 6).

    python benchmarks/rl.py [--out benchmarks/out/rl] [--steps 300] [--budget_s 1800]

1. Warm start: the tiny preset (vocabulary 14: rl/tasks.py's character tokenizer) is trained by the
   training loop on solved sums (rl/warm_start.py), --sft_chunk steps at a time, until its held-out
   greedy exact-answer accuracy is between 10% and 40% (200 held-out prompts never trained on).
2. GRPO from there with configs/rl/addition_tiny.gin (rl/loop.py), held-out accuracy every
   --eval_every steps, until --steps or --budget_s (the issue's 30 minutes on this CPU) end it.
   Passes when the held-out exact-answer accuracy rose by >= 0.3 absolute.
3. Throughput (acceptance 6): after each of the steps in --compare_every, a second engine of the same
   config and weights ("the engine alone") samples the requests the RL run samples next (the same
   prompts, seeds, completions: checked token by token), timed; the ratio is the RL run's sampling
   tokens/s over the alone engine's on the same requests. It needs an idle host (the two are timed
   at different moments); the learning result does not depend on host load.
Writes <out>/rl.json (figures) and <out>/rl.png (held-out accuracy and reward over steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_name, log, set_host_devices  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_out_accuracy(model_cfg, engine_cfg, params, tokenizer, rows, max_tokens: int) -> float:
  from rl import rewards, rollout, tasks  # pylint: disable=g-import-not-at-top
  from serve.engine import Engine  # pylint: disable=g-import-not-at-top
  engine = Engine(model_cfg, params, engine_cfg)
  texts = rollout.greedy(engine, tokenizer, rows, max_tokens, tokenizer.token_to_id(tasks.EOS))
  return float(rewards.score({'e': rewards.exact_answer}, rows, texts)['e'].mean())


def warm_start(args, cfg, paths, tokenizer, held):
  """Trains the warm start in chunks until held-out accuracy is in [lo, hi]; (workdir, history)."""
  import jax  # pylint: disable=g-import-not-at-top
  from models import checkpoint_io  # pylint: disable=g-import-not-at-top
  from rl import warm_start as ws  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.out, 'sft')
  examples = ws.Examples(paths['sft'], tokenizer, args.sft_batch, cfg.seq_len, seed=args.seed)
  history, steps = [], 0
  saved = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(saved):  # a warm start from an earlier run goes on from its newest checkpoint
    steps = max([int(n) for n in os.listdir(saved) if n.isdigit()] + [0]) - args.sft_chunk
  while steps < args.sft_max_steps:
    steps += args.sft_chunk
    clock = time.perf_counter()
    ws.train(ws.config(cfg.model, steps, batch_size=args.sft_batch, seq_len=cfg.seq_len,
                       learning_rate=args.sft_lr, seed=args.seed), workdir, examples)
    _, params = checkpoint_io.load(workdir)
    acc = held_out_accuracy(cfg.model, cfg.engine, jax.device_put(params, jax.devices()[0]),
                            tokenizer, held, cfg.max_tokens)
    history.append({'step': steps, 'held_out_exact_answer': acc,
                    'seconds': time.perf_counter() - clock})
    log(f'warm start: step {steps}, held-out exact-answer accuracy {acc:.3f}')
    if acc >= args.lo:
      break
  if not args.lo <= history[-1]['held_out_exact_answer'] <= args.hi:
    raise SystemExit(f'the warm start went from below {args.lo} to '
                     f'{history[-1]["held_out_exact_answer"]:.3f} (> {args.hi}) in one chunk: '
                     'lower --sft_chunk or --sft_lr.')
  return workdir, history


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'out', 'rl'))
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--budget_s', type=float, default=1800.0, help='The whole run (warm start + RL).')
  p.add_argument('--eval_every', type=int, default=10)
  p.add_argument('--compare_every', type=int, default=10, help='0: no throughput comparison.')
  p.add_argument('--sft_chunk', type=int, default=50)
  p.add_argument('--sft_max_steps', type=int, default=2000)
  p.add_argument('--sft_batch', type=int, default=64)
  p.add_argument('--sft_lr', type=float, default=1e-3)
  p.add_argument('--lo', type=float, default=0.10)
  p.add_argument('--hi', type=float, default=0.40)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--gin_param', action='append', default=[], help='rl.* bindings over the recipe.')
  p.add_argument('--host_devices', type=int, default=1)
  args = p.parse_args(argv)
  set_host_devices(args.host_devices)
  start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  from rl import loop, rollout, tasks  # pylint: disable=g-import-not-at-top
  from rl.config import load_rl_config  # pylint: disable=g-import-not-at-top
  from serve.engine import Engine  # pylint: disable=g-import-not-at-top
  from _engine_limits import probe_now  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser('~/.cache/stoker/xla'))
  os.makedirs(args.out, exist_ok=True)
  cores = len(os.sched_getaffinity(0))
  probes = {'start': probe_now(cores)}  # a cpu share under 90%: the throughput ratio is not a result
  log(probes['start'])
  paths = tasks.write_task(os.path.join(args.out, 'task'), seed=args.seed)
  tokenizer = tokenizers.Tokenizer.from_file(paths['tokenizer'])
  base = load_rl_config(['rl/addition_tiny.gin'], args.gin_param)
  held = rollout.read_rows(paths['held_out'])[:base.eval_prompts or None]
  sft_dir, sft_history = warm_start(args, base, paths, tokenizer, held)
  sft_s = time.perf_counter() - start
  cfg = load_rl_config(['rl/addition_tiny.gin'], [
      f"rl.init = '{sft_dir}'", f"rl.task_dir = '{os.path.dirname(paths['train'])}'",
      f'rl.steps = {args.steps}', f'rl.eval_every = {args.eval_every}', f'rl.seed = {args.seed}',
      'checkpoint.every_steps = 0'] + args.gin_param)
  workdir = os.path.join(args.out, f'grpo-{time.strftime("%Y%m%d-%H%M%S")}')
  compared, alone = [], {}

  def on_step(run, step):
    if args.compare_every and step % args.compare_every == 0 and step < cfg.steps:
      engine = alone.get('engine')
      if engine is None:
        engine = alone['engine'] = Engine(cfg.model, run.engine.params, cfg.engine)
      engine.update_params(run.engine.params)
      alone[step] = run.sample(engine, step)  # what the RL run samples at its next step
    if time.perf_counter() - start > args.budget_s:
      raise _OutOfTime(step)

  try:
    logged = loop.train(cfg, workdir, on_step=on_step)
  except _OutOfTime as e:
    log(f'budget of {args.budget_s:.0f} s spent after step {e.args[0]}')
    from train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
    logged = read_metrics(workdir)
  total_s = time.perf_counter() - start
  probes['end'] = probe_now(cores, when='end')
  log(probes['end'])
  by_step = {r['step']: r for r in logged}
  for step, samples in alone.items():
    if not isinstance(step, int) or step + 1 not in by_step:
      continue
    rl_record = by_step[step + 1]
    assert samples.tokens == rl_record['sampled_tokens'], 'the alone engine sampled other tokens'
    compared.append({'rl_step': step + 1, 'tokens': samples.tokens,
                     'rl_tokens_per_s': rl_record['sample_tokens_per_s'],
                     'alone_tokens_per_s': samples.tokens / samples.seconds})
  evals = [(r['step'], r['eval_exact_answer']) for r in logged if 'eval_exact_answer' in r]
  steps = [r for r in logged if 'reward_mean' in r]
  gain = evals[-1][1] - evals[0][1] if evals else float('nan')  # the last evaluation, not the best
  ratio = (sum(c['rl_tokens_per_s'] for c in compared) / sum(c['alone_tokens_per_s'] for c in compared)
           if compared else float('nan'))
  split = {k: float(np.sum([r[k] for r in steps])) for k in ('sample_s', 'score_s', 'train_s', 'update_s')}
  figures = {
      'cpu': cpu_name(), 'host_devices': args.host_devices, 'load_avg': os.getloadavg(), 'probes': probes,
      'model': 'tiny preset, vocab 14', 'params': cfg.model.num_params(),
      'warm_start': sft_history, 'warm_start_s': sft_s,
      'held_out_start': evals[0][1] if evals else None, 'held_out_final': evals[-1][1] if evals else None,
      'held_out_best': max(a for _, a in evals) if evals else None, 'gain': gain, 'passed': gain >= 0.3,
      'rl_steps': len(steps), 'total_s': total_s, 'time_split_s': split,
      'evals': evals, 'reward_mean': [(r['step'], r['reward_mean']) for r in steps],
      'sampled_exact_answer': [(r['step'], r['reward_exact_answer_mean']) for r in steps],
      'throughput_ratio_rl_over_alone': ratio, 'throughput': compared,
      'config': {k: getattr(cfg, k) for k in ('prompts_per_step', 'group_size', 'minibatches',
                                              'max_tokens', 'temperature', 'normalisation', 'beta')},
      'learning_rate': cfg.optimizer.learning_rate, 'workdir': workdir,
  }
  with open(os.path.join(args.out, 'rl.json'), 'w') as f:
    json.dump(figures, f, indent=2, default=str)
  _plot(figures, os.path.join(args.out, 'rl.png'))
  print(json.dumps({k: figures[k] for k in ('held_out_start', 'held_out_final', 'held_out_best', 'gain',
                                            'passed', 'rl_steps', 'total_s', 'time_split_s',
                                            'throughput_ratio_rl_over_alone', 'probes')}, indent=1))
  return 0 if figures['passed'] else 1


class _OutOfTime(Exception):
  pass


def _plot(figures: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  if figures['evals']:
    ax.plot(*zip(*figures['evals']), 'o-', zorder=3, label='held-out exact-answer accuracy (greedy)')
  if figures['sampled_exact_answer']:
    ax.plot(*zip(*figures['sampled_exact_answer']), alpha=0.6,
            label='exact-answer reward of the step\'s samples (temperature 1)')
  ax.set_xlabel('GRPO step')
  ax.set_ylim(0, 1.1)
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right')
  ax.set_title(f"GRPO on two-digit addition, tiny preset: held-out {figures['held_out_start']:.2f} -> "
               f"{figures['held_out_final']:.2f}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == '__main__':
  sys.exit(main())
