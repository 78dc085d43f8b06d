"""Mixture-of-experts training throughput: tiny_moe (8 experts, top-2) against a dense peer.

  python benchmarks/moe.py                          # ~1 min on 2 CPU cores
  python benchmarks/moe.py --runs 7 --steps 4 --batch_size 8 --seq_len 128

Every row trains on the same batches with Stoker's compiled train step (one device):
  dense       `tiny` with mlp_dim = k x the expert width: the same active parameters, no router
  moe         tiny_moe, dropless, grouped_matmul 'tiled' (what 'auto' picks on CPU)
  moe_cf1.25  tiny_moe in capacity-factor mode (capacity 1.25 x an even share)
  moe_ragged  tiny_moe with jax.lax.ragged_dot, which XLA:CPU lowers to one dense matmul over
              every expert (E x the work): the reason 'tiled' exists
Runs are interleaved row by row, so load from other processes falls on every row alike; the
report is each row's median tokens/s and its ratio to dense's (the paired median of per-run
ratios). The cpu-share probe, before and after the runs: a 1024 x 1024 float32 matmul, which
XLA:CPU spreads over every core, and its cpu share (this process's CPU seconds over wall seconds x
cores); under MIN_CPU_SHARE the host was shared, and the report says so (a WARNING line): its
figures are not results. Each run's own cpu share is recorded too (small ops use fewer cores, so
it is lower than the probe's even on an idle host). Writes benchmarks/out/moe.{json,png}. On a CPU
only the ratios carry over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import Clock, cpu_name, log  # noqa: E402
from data.synthetic import SyntheticData  # noqa: E402
from models import presets  # noqa: E402
from parallelism.mesh import MeshConfig, make_mesh  # noqa: E402
from train.config import OptimizerConfig, TrainConfig  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.step import batch_spec, compile_train_step, init_train_state  # noqa: E402

MIN_CPU_SHARE = 0.9  # as benchmarks/_engine_limits.py: a run with less of the cores is not a result


def rows() -> dict:
  moe = presets.preset('tiny_moe')
  dense = presets.preset('tiny', mlp_dim=moe.experts_per_token * moe.expert_mlp_dim)
  return {'dense': dense, 'moe': dataclasses.replace(moe, grouped_matmul='tiled'),
          'moe_cf1.25': dataclasses.replace(moe, capacity_factor=1.25),
          'moe_ragged': dataclasses.replace(moe, grouped_matmul='ragged_dot')}


def probe_cpu_share(n: int = 1024, repeats: int = 7) -> float:
  """The cpu share of `repeats` n x n float32 matmuls (one untimed first)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  clock = Clock()
  for _ in range(repeats):
    jax.block_until_ready(matmul(a))
  return clock.stop(os.cpu_count())[1]


def trainer(model, args):
  cfg = TrainConfig(model=model, mesh=MeshConfig(ici=(1, 1, 1)), steps=1000,
                    batch_size=args.batch_size, seq_len=args.seq_len,
                    optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0))
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  state, shardings = init_train_state(cfg, mesh, tx)
  step = compile_train_step(cfg, mesh, tx, shardings)
  spec = batch_spec(cfg, mesh)
  data = SyntheticData(model.vocab_size, args.seq_len, args.batch_size, seed=args.seed)
  batches = [{k: jax.device_put(v, spec[k].sharding) for k, v in data.batch(i).items()}
             for i in range(args.steps)]
  holder = {'state': state}

  def run():
    """(tokens/s, cpu share) of args.steps steps."""
    state = holder['state']
    clock = Clock()
    for b in batches:
      state, metrics = step(state, b)
    jax.block_until_ready((state, metrics))
    holder['state'] = state
    seconds, share = clock.stop(os.cpu_count())
    return args.steps * args.batch_size * args.seq_len / seconds, share
  return run


def main(args) -> dict:
  probes = {'start': probe_cpu_share()}
  log(f"cpu-share probe (start): {probes['start']:.0%} of {os.cpu_count()} cores")
  models = rows()
  runners = {}
  for name, model in models.items():
    log(f'compiling {name} ...')
    runners[name] = trainer(model, args)
    runners[name]()  # warm-up
  tps = {name: [] for name in models}
  shares = {name: [] for name in models}
  for r in range(args.runs):
    for name, run in runners.items():
      t, share = run()
      tps[name].append(t)
      shares[name].append(share)
    log(f'run {r + 1}/{args.runs}: ' + ', '.join(f'{n} {v[-1]:,.0f} (cpu {shares[n][-1]:.0%})'
                                                 for n, v in tps.items()))
  probes['end'] = probe_cpu_share()
  report = {
      'command': ' '.join(['python benchmarks/moe.py'] + sys.argv[1:]),
      'machine': {'cpu': cpu_name(), 'cores': os.cpu_count(),
                  'loadavg_after': open('/proc/loadavg').read().split()[:3],
                  'cpu_share_probe': probes},
      'workload': dict(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                       runs=args.runs),
      'rows': {name: {'active_params': models[name].num_active_params(),
                      'params': models[name].num_params(),
                      'tokens_per_sec': tps[name],
                      'cpu_share': shares[name],
                      'median_tokens_per_sec': statistics.median(tps[name]),
                      'ratio_vs_dense': statistics.median(
                          np.asarray(tps[name]) / np.asarray(tps['dense']))}
               for name in models}}
  for name, row in report['rows'].items():
    print(f"{name:12s} active {row['active_params'] / 1e6:5.2f}M  total "
          f"{row['params'] / 1e6:5.2f}M  {row['median_tokens_per_sec']:9,.0f} tokens/s  "
          f"{row['ratio_vs_dense']:.2f}x dense")
  print(f"load average after: {' '.join(report['machine']['loadavg_after'])} "
        f"({report['machine']['cores']} cores)")
  print(f"cpu-share probe: {probes['start']:.0%} before, {probes['end']:.0%} after the runs "
        f"(runs: median {statistics.median(sum(shares.values(), [])):.0%}) of "
        f"{os.cpu_count()} cores")
  low = min(probes.values())
  if low < MIN_CPU_SHARE:
    print(f'WARNING: the cpu-share probe had {low:.0%} of the cores (< {MIN_CPU_SHARE:.0%}): the '
          'host was shared; these figures are not results. Rerun on an idle host.')
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'moe.json'), 'w') as f:
    json.dump(report, f, indent=2)
  plot(report, os.path.join(args.out_dir, 'moe.png'))
  return report


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(report['rows'])
  ratios = [report['rows'][n]['ratio_vs_dense'] for n in names]
  fig, ax = plt.subplots(figsize=(6, 4))
  bars = ax.bar(names, ratios, color=['tab:gray'] + ['tab:blue'] * (len(names) - 1))
  for bar, r in zip(bars, ratios):
    ax.annotate(f'{r:.2f}x', (bar.get_x() + bar.get_width() / 2, r), ha='center', va='bottom')
  ax.axhline(0.5, ls='--', color='tab:red', lw=1)
  ax.set_ylabel('training tokens/s vs dense (paired median)')
  w = report['workload']
  ax.set_title(f"tiny_moe (8 experts, top-2) vs dense, same active params\n"
               f"batch {w['batch_size']}x{w['seq_len']}, {report['machine']['cpu']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--steps', type=int, default=3, help='timed steps per run')
  p.add_argument('--runs', type=int, default=5, help='interleaved runs; medians are quoted')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  args = p.parse_args(argv)
  for name in ('batch_size', 'seq_len', 'steps', 'runs'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}.')
  return args


if __name__ == '__main__':
  main(parse_args())
