"""Pruning + distillation vs training the small model from scratch (the comparison Minitron makes).

  python benchmarks/compression.py                       # T = 4M tokens: hours on 2 CPU cores
  python benchmarks/compression.py --tokens 1000000 --eval_batches 16 --runs 5  # benchmarks/README
  python benchmarks/compression.py --tokens 60000 --eval_batches 4 --runs 1 --steps 8   # smoke, minutes

One process, on the stdlib corpus (4096-token BPE, prepared on first use). A teacher (~12M params:
width 384, 4 layers, 6 query / 2 key-value heads of 64, MLP 1536) trains on T tokens. Then
  (a) pruned:     `stoker prune` by width (MLP and GQA groups kept 50%): about half the
                  non-embedding params, no training;
  (b) distilled:  (a) trained by distillation from the teacher on X = T/4 tokens (--distill_fraction);
  (c) scratch:    (b)'s shape trained from random init on all T tokens, the teacher's recipe;
  (d) int8:       (b) with int8 weights (serve/quant.py), as `stoker serve` runs it;
and, as a second row, depth pruning (half the layers by block importance) then distillation.
Each model: parameters, bytes of its weights, validation perplexity over --eval_batches batches of
the validation split (the same for all), and engine decode tokens/s at batch 1 and 16 (steady decode
after 128-token prompts, median of --runs runs, as benchmarks/int8_decode.py times it); each as a
ratio to the teacher's, measured in the same run. At this scale (millions of tokens, a 12M model)
the figures are indicative only. Writes benchmarks/out/compression.{json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time

from _common import cpu_name, huge_pages, log, set_host_devices

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEACHER = ['model.vocab_size=4096', 'model.d_model=384', 'model.num_layers=4', 'model.num_heads=6',
           'model.num_kv_heads=2', 'model.head_dim=64', 'model.mlp_dim=1536']


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--tokens', type=int, default=4_000_000, help='T: the teacher\'s training tokens')
  p.add_argument('--distill_fraction', type=float, default=0.25, help='X / T (at most 0.25)')
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--learning_rate', type=float, default=3e-3)
  p.add_argument('--distill_learning_rate', type=float, default=1e-3,
                 help='peak learning rate of the distillation runs (a pruned model starts trained)')
  p.add_argument('--distill_alpha', type=float, default=0.5)
  p.add_argument('--eval_batches', type=int, default=32)
  p.add_argument('--steps', type=int, default=32, help='timed decode steps per run')
  p.add_argument('--runs', type=int, default=3, help='timed decode runs per model and batch')
  p.add_argument('--layer_loop', default='unroll', choices=('auto', 'scan', 'unroll'),
                 help="EngineConfig.layer_loop of every engine timed. 'auto' scans the width-pruned "
                      "student's 4.1 MiB layers, 1.35x slower than unrolled at batch 1 here (1.17x "
                      'faster at batch 16); the teacher and depth-pruned unroll either way')
  p.add_argument('--host_devices', type=int, default=1)
  p.add_argument('--workdir', default=os.path.join(os.path.dirname(__file__), 'out', 'compression'),
                 help='where the runs go (reused: a finished run is not trained again)')
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  return p.parse_args(argv)


def recipe(args, steps: int, learning_rate: float | None = None) -> list[str]:
  warmup = max(1, steps // 20)
  return ["data.source='stdlib'", 'data.eval_every=0', f'train.steps={steps}',
          f'train.batch_size={args.batch_size}', f'train.seq_len={args.seq_len}',
          f'train.log_every={max(1, steps // 10)}', 'checkpoint.every_steps=0',
          f'optimizer.learning_rate={learning_rate or args.learning_rate}',
          f'optimizer.warmup_steps={warmup}',
          'mesh.ici=(-1, 1, 1)']


def train_run(name, workdir, gin_files, params) -> float:
  """Trains (unless `workdir` holds the final step already); returns seconds taken."""
  import configs  # pylint: disable=g-import-not-at-top
  from train.loop import train  # pylint: disable=g-import-not-at-top
  cfg = configs.load_train_config(gin_files, params)
  if os.path.isdir(os.path.join(workdir, 'checkpoints', str(cfg.steps))):
    log(f'{name}: {workdir} holds its final step already; not trained again')
    return 0.0
  start = time.perf_counter()
  logged = train(cfg, workdir, progress=False)
  seconds = time.perf_counter() - start
  if logged:
    log(f'{name}: {cfg.steps} steps ({cfg.steps * cfg.tokens_per_step:,} tokens) in {seconds:.0f} s, '
        f"loss {logged[0]['loss']:.3f} -> {logged[-1]['loss']:.3f}, load {os.getloadavg()[0]:.2f}")
  return seconds


def perplexity(model_cfg, params, batches) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import math  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import transformer  # pylint: disable=g-import-not-at-top
  from train.step import loss_sums  # pylint: disable=g-import-not-at-top
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: transformer.Transformer(model_cfg, nnx.Rngs(0))))
  step = jax.jit(lambda p, b: loss_sums(p, graphdef, b, 0.0)[1])
  nll = tokens = 0.0
  for batch in batches:
    n, t = step(params, batch)
    nll, tokens = nll + float(n), tokens + float(t)
  return math.exp(nll / tokens)


def decode_speeds(models: dict, args) -> dict:
  """Engine decode tokens/s at batch 1 and 16 of each (model_cfg, params, weight_dtype) in `models`:
  median of args.runs runs, the models interleaved run by run so that a change in the machine's load
  falls on all of them alike."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from int8_decode import decode_tokens, time_decode  # pylint: disable=g-import-not-at-top
  from serve.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  timing = argparse.Namespace(prompt_len=128, steps=args.steps, warmup_steps=4)
  G = 16
  M = -(-(timing.prompt_len + decode_tokens(timing, EngineConfig().token_budget)) // G)
  engines = {key: Engine(cfg, params, EngineConfig(weight_dtype=weights, max_seqs=16, page_size=G,
                                                   prefix_caching=False, max_pages_per_seq=M,
                                                   num_pages=16 * M + 1, layer_loop=args.layer_loop))
             for key, (cfg, params, weights) in models.items()}
  rng = np.random.default_rng(0)
  out = {key: {} for key in engines}
  shares = []
  for batch in (1, 16):
    prompts = [rng.integers(1, 4096, 128).tolist() for _ in range(batch)]
    times = {key: [] for key in engines}
    for key, engine in engines.items():  # warm-up: every bucket compiled and dispatched once
      time_decode(engine, prompts, argparse.Namespace(**{**vars(timing), 'steps': 4}))
    for _ in range(args.runs):
      for key, engine in engines.items():
        seconds, share = time_decode(engine, prompts, timing)
        times[key].append(seconds)
        shares.append(share)
    for key in engines:
      out[key][batch] = batch / statistics.median(times[key])
    log(f'decode batch {batch}: ' + ', '.join(f'{k[0]} {out[k][batch]:.0f} tok/s' for k in engines) +
        f', load {os.getloadavg()[0]:.2f}')
  return out, statistics.median(shares)


def main(argv=None, pages: str = 'huge pages: not asked for') -> int:
  args = parse_args(argv)
  if not 0 < args.distill_fraction <= 0.25:
    raise SystemExit(f'--distill_fraction {args.distill_fraction}: the issue allows X <= T/4.')
  set_host_devices(args.host_devices)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top
  from models import checkpoint_io  # pylint: disable=g-import-not-at-top
  from serve import quant  # pylint: disable=g-import-not-at-top
  from train import compress, datasets, prune  # pylint: disable=g-import-not-at-top

  root = args.workdir
  os.makedirs(root, exist_ok=True)
  per_step = args.batch_size * args.seq_len
  steps_T = max(1, args.tokens // per_step)
  steps_X = max(1, int(args.tokens * args.distill_fraction) // per_step)
  base = ['train/tiny_cpu.gin']
  teacher = os.path.join(root, 'teacher')
  seconds = {'teacher': train_run('teacher', teacher, base, recipe(args, steps_T) + TEACHER)}

  shapes = {'width': prune.KeepFractions(0.5, 0.5, 1.0, 1.0),
            'depth': prune.KeepFractions(1.0, 1.0, 0.5, 1.0)}
  for shape, fractions in shapes.items():
    pruned = os.path.join(root, f'{shape}-pruned')
    if not os.path.isdir(pruned):
      record = compress.prune_checkpoint(pruned, fractions, checkpoint=teacher,
                                         calibration_batches=8, command=['benchmark'])
      log(f'{shape} pruning:\n{compress.describe(record)}')
    distilled = os.path.join(root, f'{shape}-distilled')
    if not os.path.isdir(distilled):
      shutil.copytree(pruned, distilled)
    gin = [os.path.join(pruned, 'train.gin')]
    seconds[f'{shape}-distilled'] = train_run(
        f'{shape} distilled', distilled, gin, recipe(args, steps_X, args.distill_learning_rate) + [
            f"distill.teacher='{teacher}'", f'distill.alpha={args.distill_alpha}'])
    if shape == 'width':
      seconds['width-scratch'] = train_run('width scratch', os.path.join(root, 'width-scratch'),
                                           gin, recipe(args, steps_T))

  cfg = configs.load_train_config(base, recipe(args, steps_T) + TEACHER)
  with datasets.validation_batches(cfg, datasets.data_dir(cfg)) as val:
    batches = [{k: np.asarray(v) for k, v in b.items()} for b, _ in zip(val, range(args.eval_batches))]
  rows = [('teacher', 'teacher', None, steps_T), ('(a) width pruned', 'width-pruned', None, 0),
          ('(b) width pruned + distilled', 'width-distilled', None, steps_X),
          ('(c) width shape from scratch', 'width-scratch', None, steps_T),
          ('(d) (b) with int8 weights', 'width-distilled', 'int8', steps_X),
          ('depth pruned', 'depth-pruned', None, 0),
          ('depth pruned + distilled', 'depth-distilled', None, steps_X)]
  results, served_models = [], {}
  for label, run, weights, steps in rows:
    model_cfg, params = checkpoint_io.load(os.path.join(root, run))
    model_cfg = dataclasses.replace(model_cfg, remat='none')
    served = quant.quantize_params(params) if weights else params
    ppl = perplexity(model_cfg, served, batches)
    # Decode speed depends on the shape and the weights' dtype only.
    key = (f'L{model_cfg.num_layers} N{model_cfg.num_heads} F{model_cfg.mlp_dim} {weights or "f32"}',)
    served_models.setdefault(key, (model_cfg, params, weights))
    results.append(dict(model=label, run=run, weights=weights or model_cfg.param_dtype, key=key[0],
                        params=model_cfg.num_params(),
                        non_embedding_params=model_cfg.num_params() - 2 * model_cfg.vocab_size * model_cfg.d_model,
                        bytes=quant.nbytes(served), val_perplexity=ppl,
                        training_tokens=steps * per_step))
    log(f'{label}: perplexity {ppl:.2f}')
  from _engine_limits import probe_now  # pylint: disable=g-import-not-at-top
  probes = probe_now(len(os.sched_getaffinity(0)))
  log(f'{probes}; {pages}')
  speeds, share = decode_speeds(served_models, args)
  for r in results:
    r['decode_tok_s_b1'], r['decode_tok_s_b16'] = speeds[(r['key'],)][1], speeds[(r['key'],)][16]
  ref = results[0]
  for r in results:
    for k in ('params', 'non_embedding_params', 'bytes', 'val_perplexity', 'decode_tok_s_b1',
              'decode_tok_s_b16'):
      r[f'{k}_ratio'] = r[k] / ref[k]

  header = (f"{'model':<30} {'params':>7} {'non-emb':>7} {'bytes':>6} {'val ppl':>8} {'ppl':>6} "
            f"{'tok/s b1':>8} {'tok/s b16':>9} {'tokens':>10}")
  lines = [f'T = {steps_T * per_step:,} tokens, X = {steps_X * per_step:,}; ratios to the teacher '
           f'(same run); {cpu_name()}, {len(os.sched_getaffinity(0))} cores, load '
           f'{os.getloadavg()[0]:.2f}; decode runs\' median cpu share {share:.0%}, {probes}; layers '
           f'{args.layer_loop}; {pages}. Indicative only at this scale.', header]
  for r in results:
    lines.append(f"{r['model']:<30} {r['params_ratio']:>7.3f} {r['non_embedding_params_ratio']:>7.3f} "
                 f"{r['bytes_ratio']:>6.3f} {r['val_perplexity']:>8.2f} {r['val_perplexity_ratio']:>6.3f} "
                 f"{r['decode_tok_s_b1_ratio']:>8.2f} {r['decode_tok_s_b16_ratio']:>9.2f} "
                 f"{r['training_tokens']:>10,}")
  print('\n'.join(lines))
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'compression.json'), 'w') as f:
    json.dump({'args': vars(args), 'device': jax.devices()[0].device_kind, 'cpu': cpu_name(),
               'train_seconds': seconds, 'results': results, 'table': lines, 'cpu_share': share,
               'probes': probes, 'huge_pages': pages}, f, indent=2)
  plot(results, os.path.join(args.out_dir, 'compression.png'))
  return 0


def plot(results, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  metrics = [('non_embedding_params_ratio', 'non-embedding params'), ('bytes_ratio', 'bytes'),
             ('val_perplexity_ratio', 'val perplexity'), ('decode_tok_s_b1_ratio', 'decode tok/s b1'),
             ('decode_tok_s_b16_ratio', 'decode tok/s b16')]
  fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4), sharey=True)
  names = [r['model'] for r in results]
  for ax, (key, title) in zip(axes, metrics):
    ax.barh(range(len(results)), [r[key] for r in results])
    ax.axvline(1.0, color='k', lw=0.8)
    ax.set_title(f'{title} / teacher')
  axes[0].set_yticks(range(len(results)), names)
  axes[0].invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


if __name__ == '__main__':
  pages = huge_pages()
  sys.exit(main(pages=pages))
