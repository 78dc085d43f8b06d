"""Int8 weights vs float32: decode step time of the serving engine, batch 1 and batch 16.

  python benchmarks/int8_decode.py               # small preset, ~3 min on 2 CPU cores
  python benchmarks/int8_decode.py --runs 7 --steps 48

One process, one random `small` model (~126M params, float32), two engines that differ only in
EngineConfig.weight_dtype (None vs 'int8'; max_seqs 16, page_size 16, prefix caching off). For
each batch size, each timed run starts `batch` requests of --prompt_len random tokens, prefills them
(untimed), then times --steps steady decode steps (every sequence decoding). Runs interleave the
engines; medians are quoted with the ratio int8 / float32 of step time (paired by run).

Beside the figures, the probes that say how fast this host is (those of serve_engine.py,
_engine_limits.py): float32 matmul peak and memory bandwidth (a jitted sum over a 1 GiB float32
array), and the bytes one decode step reads (weights, keys and values) with the time that reading
takes at that bandwidth. Each timed run's cpu share (process time / wall / cores) is printed; a
WARNING when one falls under 90% (another job may have taken the cores). Writes
benchmarks/out/int8_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from _common import Clock, log

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUSY_CPU_SHARE = 0.90


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--preset', default='small')
  p.add_argument('--batches', default='1,16', help='comma-separated decode batch sizes')
  p.add_argument('--prompt_len', type=int, default=256)
  p.add_argument('--steps', type=int, default=32, help='timed decode steps per run')
  p.add_argument('--warmup_steps', type=int, default=4, help='decode steps before timing')
  p.add_argument('--runs', type=int, default=5, help='timed runs per engine and batch')
  p.add_argument('--bandwidth_gib', type=float, default=1.0, help='size of the bandwidth probe')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  args = p.parse_args(argv)
  args.batches = tuple(int(b) for b in args.batches.split(','))
  if max(args.batches) > 16 or min(args.batches) < 1:
    p.error(f'--batches must lie in 1..16 (the engines hold 16 sequences), got {args.batches}.')
  return args


def decode_tokens(args, token_budget: int) -> int:
  """max_tokens of a request: the first ones started decode while the last prefills."""
  return 16 * -(-args.prompt_len // token_budget) + args.warmup_steps + args.steps + 8


def time_decode(engine, prompts, args) -> tuple[float, float]:
  """(seconds per decode step, cpu share) of one run: prefill `prompts`, then time args.steps."""
  from serve.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  ids = [f'run-{engine.stats["steps"]}-{i}' for i in range(len(prompts))]
  sp = SamplingParams(max_tokens=decode_tokens(args, engine.config.token_budget))
  for request_id, prompt in zip(ids, prompts):
    engine.add_request(request_id, prompt, sp)
  started = set()
  while len(started) < len(ids):  # prefill: until every request has its first token
    started.update(o.request_id for o in engine.step())
  for _ in range(args.warmup_steps):
    engine.step()
  clock = Clock()
  for _ in range(args.steps):
    outputs = engine.step()
    assert len(outputs) == len(ids), 'a sequence stopped decoding inside the timed steps'
  wall, share = clock.stop(cores=len(os.sched_getaffinity(0)))
  for request_id in ids:
    engine.abort(request_id)
  while engine.has_work:
    engine.step()
  return wall / args.steps, share


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import presets, transformer  # pylint: disable=g-import-not-at-top
  from serve import quant  # pylint: disable=g-import-not-at-top
  from serve.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from _engine_limits import probe_bandwidth, probe_peak  # pylint: disable=g-import-not-at-top

  cores = len(os.sched_getaffinity(0))
  peak = probe_peak(cores)['flops_per_s']
  bandwidth = probe_bandwidth(cores, int(args.bandwidth_gib * 2**30))['bytes_per_s']
  log(f'probes: float32 matmul peak {peak / 1e9:.0f} GFLOP/s, memory bandwidth '
      f'{bandwidth / 1e9:.1f} GB/s ({cores} cores, load {os.getloadavg()[0]:.2f})')

  cfg = presets.preset(args.preset, dtype='float32')
  params = nnx.state(transformer.Transformer(cfg, nnx.Rngs(args.seed)))
  G = 16
  M = -(-(args.prompt_len + decode_tokens(args, EngineConfig().token_budget)) // G)
  base = dict(max_seqs=16, page_size=G, prefix_caching=False, max_pages_per_seq=M,
              num_pages=16 * M + 1)
  engines = {}
  for name, weight_dtype in (('float32', None), ('int8', 'int8')):
    engines[name] = Engine(cfg, params, EngineConfig(weight_dtype=weight_dtype, **base))
    log(f'{name}: compiled in {engines[name].stats["compile_s"]:.1f} s')
  del params

  # What one decode step must read: every weight but the embedding table (only its rows are
  # gathered), plus the batch's keys and values.
  weights = {}
  for name, engine in engines.items():
    table = quant.nbytes(engine.params['embed_VD'])
    weights[name] = quant.nbytes(engine.params) - table
  kv_token = engines['float32'].kv_spec.bytes_per_token
  rng = np.random.default_rng(args.seed + 1)
  results = {}
  for batch in args.batches:
    prompts = [rng.integers(1, cfg.vocab_size, args.prompt_len).tolist() for _ in range(batch)]
    for name in engines:  # warm-up run (first dispatch of each bucket)
      time_decode(engines[name], prompts, replace(args, steps=2))
    runs = {name: [] for name in engines}
    order = list(engines)
    for r in range(args.runs):
      for name in (order if r % 2 == 0 else order[::-1]):
        runs[name].append(time_decode(engines[name], prompts, args))
      log(f'batch {batch:2d} run {r + 1}/{args.runs}: ' + ', '.join(
          f'{n} {v[-1][0] * 1e3:.1f} ms/step (cpu {v[-1][1]:.0%})' for n, v in runs.items()) +
          f', load {os.getloadavg()[0]:.2f}')
    kv = batch * (args.prompt_len + args.warmup_steps + args.steps // 2) * kv_token
    results[batch] = {
        name: {'step_s': [t for t, _ in v], 'cpu_share': [s for _, s in v],
               'median_step_s': statistics.median(t for t, _ in v),
               'weight_bytes_read': weights[name], 'kv_bytes_read': kv,
               'step_s_at_bandwidth': (weights[name] + kv) / bandwidth}
        for name, v in runs.items()}
    results[batch]['int8_over_float32'] = statistics.median(
        a[0] / b[0] for a, b in zip(runs['int8'], runs['float32']))

  lines = [f'{args.preset} preset, decode step time, median of {args.runs} runs of {args.steps} '
           f'steps after {args.prompt_len}-token prompts; float32 matmul peak {peak / 1e9:.0f} '
           f'GFLOP/s, memory bandwidth {bandwidth / 1e9:.1f} GB/s, {cores} cores. Read per step: '
           'the weights (quant.nbytes of the params, less the embedding table, of which only rows '
           'are gathered) and the batch\'s keys/values; "ms at bw": that read at the bandwidth.',
           f"{'batch':>5} {'weights':>8} {'ms/step':>8} {'tok/s':>7} {'weight MB':>9} "
           f"{'KV MB':>6} {'ms at bw':>8} {'min cpu':>7}"]
  shares = []
  for batch, res in results.items():
    for name in engines:
      r = res[name]
      shares += r['cpu_share']
      lines.append(f"{batch:>5} {name:>8} {r['median_step_s'] * 1e3:>8.2f} "
                   f"{batch / r['median_step_s']:>7.1f} {r['weight_bytes_read'] / 1e6:>9.1f} "
                   f"{r['kv_bytes_read'] / 1e6:>6.1f} {r['step_s_at_bandwidth'] * 1e3:>8.2f} "
                   f"{min(r['cpu_share']):>7.0%}")
    lines.append(f"{batch:>5} int8 / float32 step time {res['int8_over_float32']:.3f} (median of "
                 f"paired runs): int8 decodes {1 / res['int8_over_float32']:.2f}x as fast")
  if min(shares) < BUSY_CPU_SHARE:
    lines.append(f'WARNING: a timed run had a cpu share of {min(shares):.0%} (< '
                 f'{BUSY_CPU_SHARE:.0%}): another job may have shared the cores (see the load in '
                 'the log; int8 runs sit near 90% on a quiet host); rerun if any is near 50%.')
  print('\n'.join(lines))
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'int8_decode.json'), 'w') as f:
    json.dump({'args': vars(args), 'device': jax.devices()[0].device_kind,
               'peak_flops': peak, 'bandwidth_bytes_per_s': bandwidth, 'cores': cores,
               'results': {str(b): r for b, r in results.items()}}, f, indent=2)
  return 0


def replace(args: argparse.Namespace, **changes) -> argparse.Namespace:
  return argparse.Namespace(**{**vars(args), **changes})


if __name__ == '__main__':
  sys.exit(main())
