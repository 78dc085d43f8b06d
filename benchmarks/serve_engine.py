"""Serving engine: throughput vs transformers and a dense-cache decode, KV capacity, tail latency,
and how close the engine and `stoker serve` come to the machine's limits (issue 21).

  python benchmarks/serve_engine.py                    # tiny preset (limits: small), 2 CPU cores
  python benchmarks/serve_engine.py --runs 5 --sections throughput,tbt
  python benchmarks/serve_engine.py --sections limits,server --limits_preset small

One process, one random model (LlamaForCausalLM shapes, weights drawn once and loaded into both
frameworks with models.hf.params_from_hf), one set of prompts. Sections:
  throughput  output tokens/s at saturation, greedy, every prompt generating --max_tokens tokens:
              serve.engine.Engine (continuous batching, paged cache) vs transformers `generate`
              (PyTorch, static batches, left-padded) vs a naive dense-cache JAX decode (static
              batches, one [B, S_max] cache, every step attends over S_max). Each peer's model
              FLOPs/s as a share of the matmul peak; the engine's time per step, split.
  capacity    the most sequences running at once within a fixed KV memory budget, on a long-tailed
              length mix: on-demand pages (measured, engine run) vs max-length reservation (budget /
              max length), and the output tokens/s of both.
  tbt         time between tokens of running decodes while long prompts arrive: Policy.CHUNKED
              (Sarathi-Serve) vs Policy.PREFILL_FIRST (vLLM v0), same budget: P50 and P99.
  startup     engine start-up (compile of every budget bucket) in a fresh process, cold and then
              with the persistent compilation cache warm.
  limits      a decode step of 16 sequences at 256-token contexts (--limits_preset), Engine.step()
              and the compiled step alone, against max(FLOPs / peak, bytes / bandwidth).
  server      (opt-in) `stoker serve` at saturation vs Engine.generate, same prompts and config.
Beside every figure: probes of this run (matmul peak, memory bandwidth; _engine_limits.py) and the
cpu share of its runs (under 90%: a WARNING). Medians over --runs runs, interleaved; ratios against
the peer measured in the same run. Writes benchmarks/out/serve_engine.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import sys

SECTIONS = ('throughput', 'capacity', 'tbt', 'startup', 'limits', 'server')
DEFAULT_SECTIONS = SECTIONS[:-1]  # server starts a process and takes minutes: opt-in


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--preset', default='tiny', help='a plain Llama models.presets name')
  p.add_argument('--sections', default=','.join(DEFAULT_SECTIONS), help=f'comma-separated: {SECTIONS}')
  p.add_argument('--runs', type=int, default=3, help='timed runs per peer; medians are quoted')
  p.add_argument('--num_prompts', type=int, default=32)
  p.add_argument('--batch', type=int, default=16,
                 help='concurrent sequences: static batch size of the peers, engine max_seqs')
  p.add_argument('--prompt_len', default='16,128', help='min,max prompt length (uniform)')
  p.add_argument('--max_tokens', type=int, default=64, help='output tokens per prompt')
  p.add_argument('--token_budget', type=int, default=256)
  p.add_argument('--page_size', type=int, default=16)
  p.add_argument('--min_bucket', type=int, default=1,
                 help='the engines\' smallest token bucket (EngineConfig\'s default)')
  p.add_argument('--weight_layout', default='auto',
                 help='the engines\' EngineConfig.weight_layout (auto: out_major on CPU from width 768)')
  p.add_argument('--kv_tokens', type=int, default=2048, help='capacity: KV budget in tokens')
  p.add_argument('--max_len', type=int, default=512, help='capacity: longest request')
  p.add_argument('--threads', type=int, default=0,
                 help='CPU threads for both frameworks (0: all cores); 1 also makes XLA single-'
                      'threaded, which keeps ratios meaningful on a host shared with other jobs')
  p.add_argument('--limits_preset', default='small', help='the model of the limits and server sections')
  p.add_argument('--limits_seqs', type=int, default=16, help='limits: sequences decoding')
  p.add_argument('--limits_context', type=int, default=256, help='limits: their mean context')
  p.add_argument('--limits_steps', type=int, default=20, help='limits: steps per timed run')
  p.add_argument('--server_requests', type=int, default=32, help='server: sent at once')
  p.add_argument('--server_prompt_len', default='64,128', help='server: min,max prompt length')
  p.add_argument('--server_max_tokens', type=int, default=64, help='server: output tokens each')
  p.add_argument('--probe_mib', type=int, default=1024, help='bandwidth probe: MiB of float32 summed')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  p.add_argument('--startup_probe', metavar='CACHE_DIR', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.sections = tuple(s for s in args.sections.split(',') if s)
  unknown = set(args.sections) - set(SECTIONS)
  if unknown:
    p.error(f'--sections: unknown {sorted(unknown)}; choose from {SECTIONS}.')
  args.prompt_len = tuple(int(x) for x in args.prompt_len.split(','))
  args.server_prompt_len = tuple(int(x) for x in args.server_prompt_len.split(','))
  for name in ('runs', 'num_prompts', 'batch', 'max_tokens', 'token_budget', 'page_size',
               'limits_seqs', 'limits_context', 'limits_steps', 'server_requests',
               'server_max_tokens', 'probe_mib'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}.')
  return args


from _common import Clock, log, set_host_devices  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, without pip install -e

if __name__ == '__main__':
  ARGS = parse_args()
  set_host_devices(1)
  if ARGS.threads == 1:
    os.environ['XLA_FLAGS'] += ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'

# pylint: disable=wrong-import-position  (jax must start after XLA_FLAGS is set)
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from models import presets, transformer  # noqa: E402
from serve.engine import Engine, EngineConfig  # noqa: E402
from serve.sampling import SamplingParams  # noqa: E402
from serve.scheduler import Policy  # noqa: E402
from serve_peers import DenseDecoder, hf_generate, hf_llama, stoker_params  # noqa: E402
import _engine_limits as limits  # noqa: E402


# ----------------------------------------------------------------------------- prompts


def random_prompts(rng, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
  return [rng.integers(1, vocab, int(k)).tolist() for k in rng.integers(lo, hi + 1, n)]


# ----------------------------------------------------------------------------- sections


def engine_config(args, **overrides) -> EngineConfig:
  fields = dict(page_size=args.page_size, max_seqs=args.batch, token_budget=args.token_budget,
                min_bucket=args.min_bucket, prefix_caching=False, attention='auto',
                weight_layout=args.weight_layout)
  fields.update(overrides)
  return EngineConfig(**fields)


def timed(fn, cores):
  clock = Clock()
  out = fn()
  wall, cpu = clock.stop(cores=cores)
  return out, wall, cpu


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
  """Share of identical outputs and mean share of each output before the first difference."""
  same = sum(x == y for x, y in zip(a, b)) / len(a)
  prefix = []
  for x, y in zip(a, b):
    n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
    prefix.append(n / max(len(x), 1))
  return {'identical': same, 'mean_common_prefix': float(np.mean(prefix))}


def section_throughput(args, cfg, params, hf_model, cores) -> dict:
  rng = np.random.default_rng(args.seed + 1)
  lo, hi = args.prompt_len
  prompts = random_prompts(rng, args.num_prompts, lo, hi, cfg.vocab_size)
  G = args.page_size
  M = -(-(hi + args.max_tokens) // G)
  ecfg = engine_config(args, num_pages=args.batch * M + 1, max_pages_per_seq=M)
  engine = Engine(cfg, params, ecfg)
  dense = DenseDecoder(cfg, params, args.batch, hi, hi + args.max_tokens)
  log(f'[throughput] engine compiled in {engine.stats["compile_s"]:.1f} s '
      f'({len(ecfg.buckets())} buckets), dense decode in {dense.compile_s:.1f} s')
  sp = SamplingParams(max_tokens=args.max_tokens)
  peers = {'engine': lambda: engine.generate(prompts, sp),
           'dense_jax': lambda: dense.generate(prompts, args.max_tokens),
           'hf_generate': lambda: hf_generate(hf_model, prompts, args.batch, args.max_tokens)}
  outputs = {name: fn() for name, fn in peers.items()}  # warm-up (and the outputs compared)
  stats_before = dict(engine.stats)
  results = {name: {'seconds': [], 'cpu_share': []} for name in peers}
  order = list(peers)
  for r in range(args.runs):
    for name in (order if r % 2 == 0 else order[::-1]):
      out, wall, cpu = timed(peers[name], cores)
      assert sum(map(len, out)) == args.num_prompts * args.max_tokens, name
      results[name]['seconds'].append(wall)
      results[name]['cpu_share'].append(cpu)
    log(f'[throughput] run {r + 1}/{args.runs}: ' + ', '.join(
        f'{n} {v["seconds"][-1]:.2f} s' for n, v in results.items()))
  tokens = args.num_prompts * args.max_tokens
  for name, res in results.items():
    res['tokens_per_sec'] = [tokens / s for s in res['seconds']]
    res['median_tokens_per_sec'] = statistics.median(res['tokens_per_sec'])
    res['median_cpu_share'] = statistics.median(res['cpu_share'])
    for peer in ('hf_generate', 'dense_jax'):
      res[f'paired_ratio_vs_{peer}'] = statistics.median(
          b / a for a, b in zip(res['seconds'], results[peer]['seconds']))
  return {'prompts': args.num_prompts, 'prompt_len': [lo, hi], 'max_tokens': args.max_tokens,
          'batch': args.batch, 'engine_config': dataclasses.asdict(ecfg),
          'engine_steps_per_run': engine.stats['steps'] / (args.runs + 1),
          'engine_host_s_per_step': (engine.stats['host_s'] - engine.stats['wait_s'])
          / engine.stats['steps'],
          'engine_step_split_ms': limits.step_split(stats_before, engine.stats),
          'model_flops': limits.generate_flops(cfg, map(len, prompts), args.max_tokens),
          'agreement_vs_engine': {n: agreement(outputs['engine'], o) for n, o in outputs.items()
                                  if n != 'engine'},
          'peers': results}


def long_tailed_mix(rng, n: int, max_len: int, vocab: int):
  """Log-normal prompt and output lengths (medians 48 and 32, sigma 1), capped at max_len."""
  prompt = np.clip(rng.lognormal(np.log(48), 1.0, n), 4, max_len // 2).astype(int)
  output = np.clip(rng.lognormal(np.log(32), 1.0, n), 2, max_len - prompt).astype(int)
  return [rng.integers(1, vocab, int(k)).tolist() for k in prompt], output.tolist()


def run_counting(engine: Engine, prompts, outputs) -> tuple[list[int], float]:
  """Runs every request; returns the sequences running at each step while any waited, and s."""
  for i, (p, m) in enumerate(zip(prompts, outputs)):
    engine.add_request(f'c{i}', p, SamplingParams(max_tokens=m))
  running, start = [], time.perf_counter()
  while engine.has_work:
    engine.step()
    if engine.scheduler.num_waiting:
      running.append(engine.scheduler.num_running)
  return running, time.perf_counter() - start


def section_capacity(args, cfg, params, cores) -> dict:
  rng = np.random.default_rng(args.seed + 2)
  G = args.page_size
  prompts, outputs = long_tailed_mix(rng, 96, args.max_len, cfg.vocab_size)
  pages = args.kv_tokens // G
  reserved = args.kv_tokens // args.max_len  # each sequence holds max_len tokens of KV from the start
  common = dict(num_pages=pages + 1, max_pages_per_seq=-(-args.max_len // G), watermark=0.0)
  on_demand = Engine(cfg, params, engine_config(args, max_seqs=64, **common))
  reservation = Engine(cfg, params, engine_config(args, max_seqs=reserved, **common))
  res = {'kv_tokens': args.kv_tokens, 'max_len': args.max_len, 'requests': len(prompts),
         'prompt_len_p50_p99': [float(np.percentile(list(map(len, prompts)), q)) for q in (50, 99)],
         'output_len_p50_p99': [float(np.percentile(outputs, q)) for q in (50, 99)],
         'reservation_max_concurrent': reserved}
  tokens = sum(outputs)
  for name, engine in (('on_demand', on_demand), ('reservation', reservation)):
    before = engine.stats['preemptions']
    (running, wall), _, cpu = timed(lambda e=engine: run_counting(e, prompts, outputs), cores)
    res[name] = {'max_concurrent': max(running), 'median_concurrent': statistics.median(running),
                 'preemptions': engine.stats['preemptions'] - before,
                 'tokens_per_sec': tokens / wall, 'seconds': wall, 'cpu_share': cpu}
    log(f'[capacity] {name}: up to {max(running)} running (median '
        f'{statistics.median(running)}), {tokens / wall:,.0f} tokens/s')
  res['concurrency_ratio'] = res['on_demand']['max_concurrent'] / reserved
  res['throughput_ratio'] = (res['on_demand']['tokens_per_sec']
                             / res['reservation']['tokens_per_sec'])
  return res


def mixed_load(engine: Engine, rng, vocab: int, decoders: int = 8, long_prompts: int = 6,
               long_len: int = 512, period: int = 12) -> list[float]:
  """`decoders` short-prompt requests decode; once they all have tokens, a long prompt arrives
  every `period` tokens of decoder 0. Returns every time between tokens of the decoders."""
  ids = [f'd{i}' for i in range(decoders)]
  for i in ids:
    engine.add_request(i, rng.integers(1, vocab, 16).tolist(),
                       SamplingParams(max_tokens=(long_prompts + 2) * period))
  last, gaps, arrived, count = {}, [], 0, 0
  while engine.has_work:
    outs = engine.step()
    now = time.perf_counter()
    for o in outs:
      if o.request_id in last:
        gaps.append(now - last[o.request_id])
      if o.request_id in ids:
        last[o.request_id] = now
        count += o.request_id == ids[0]
    if len(last) == decoders and arrived < long_prompts and count >= (arrived + 1) * period:
      engine.add_request(f'long{arrived}', rng.integers(1, vocab, long_len).tolist(),
                         SamplingParams(max_tokens=2))
      arrived += 1
  return gaps


def section_tbt(args, cfg, params, cores) -> dict:
  budget, long_len = 128, 512
  G = args.page_size
  common = dict(num_pages=8 * 8 + 6 * (long_len // G + 1) + 1,
                max_pages_per_seq=-(-(long_len + 2) // G), token_budget=budget, max_seqs=16)
  engines = {p.value: Engine(cfg, params, engine_config(args, policy=p, **common))
             for p in (Policy.CHUNKED, Policy.PREFILL_FIRST)}
  res = {'token_budget': budget, 'decoders': 8, 'long_prompt_len': long_len, 'long_prompts': 6,
         'policies': {name: {'p50_s': [], 'p99_s': [], 'max_s': [], 'cpu_share': []}
                      for name in engines}}
  for r in range(args.runs):
    for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
      gaps, _, cpu = timed(lambda n=name: mixed_load(
          engines[n], np.random.default_rng(args.seed + 3 + r), cfg.vocab_size), cores)
      out = res['policies'][name]
      out['cpu_share'].append(cpu)
      out['p50_s'].append(float(np.percentile(gaps, 50)))
      out['p99_s'].append(float(np.percentile(gaps, 99)))
      out['max_s'].append(float(np.max(gaps)))
    log(f'[tbt] run {r + 1}/{args.runs}: ' + ', '.join(
        f'{n} P99 {v["p99_s"][-1] * 1e3:.0f} ms' for n, v in res['policies'].items()))
  for out in res['policies'].values():
    for q in ('p50_s', 'p99_s', 'max_s'):
      out[f'median_{q}'] = statistics.median(out[q])
  chunked, pf = res['policies']['chunked'], res['policies']['prefill_first']
  res['p99_ratio_prefill_first_over_chunked'] = statistics.median(
      b / a for a, b in zip(chunked['p99_s'], pf['p99_s']))
  return res


def startup_probe(args) -> None:
  """Child process: build the throughput engine with the persistent cache in --startup_probe."""
  cfg = presets.preset(args.preset, dtype='float32' if jax.default_backend() == 'cpu' else 'auto')
  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nnx.state(abstract))
  M = -(-(args.prompt_len[1] + args.max_tokens) // args.page_size)
  engine = Engine(cfg, params, engine_config(args, num_pages=args.batch * M + 1,
                                             max_pages_per_seq=M,
                                             compilation_cache_dir=args.startup_probe))
  print(json.dumps({'compile_s': engine.stats['compile_s']}))


def section_startup(args) -> dict:
  same = [f'--{k}={v}' for k, v in (('preset', args.preset), ('batch', args.batch),
                                    ('prompt_len', ','.join(map(str, args.prompt_len))),
                                    ('max_tokens', args.max_tokens),
                                    ('token_budget', args.token_budget),
                                    ('page_size', args.page_size))]
  with tempfile.TemporaryDirectory() as cache_dir:
    times = []
    for _ in range(2):
      start = time.perf_counter()
      out = subprocess.run([sys.executable, __file__, '--startup_probe', cache_dir] + same,
                           check=True, capture_output=True, text=True)
      times.append({'process_s': time.perf_counter() - start,
                    **json.loads(out.stdout.strip().splitlines()[-1])})
  log(f'[startup] cold compile {times[0]["compile_s"]:.1f} s, warm {times[1]["compile_s"]:.1f} s')
  return {'cold': times[0], 'warm': times[1],
          'compile_speedup': times[0]['compile_s'] / times[1]['compile_s']}


# ----------------------------------------------------------------------------- report


def table(report: dict) -> str:
  m = report['machine']
  lines = [f"Serving engine benchmark, preset {report['preset']} ({report['params'] / 1e6:.1f}M), "
           f"{m['cpu']} ({m['cpu_cores']} cores, {report['threads']} threads per framework), JAX "
           f"{m['jax']} {m['jax_backend']}, torch {m['torch']}, transformers {m['transformers']}; "
           f"{report['date']}, load average before {report['load_average_before'][0]:.1f}",
           limits.probe_line(report), '']
  t = report.get('throughput')
  if t:
    lines += [f"Throughput at saturation: {t['prompts']} prompts of {t['prompt_len'][0]}-"
              f"{t['prompt_len'][1]} tokens, {t['max_tokens']} greedy output tokens each, "
              f"{t['batch']} sequences at once; medians of {len(t['peers']['engine']['seconds'])} runs",
              f"{'peer':<14}{'tokens/s':>10}{'cpu':>6}{'vs hf':>8}{'vs dense':>10}{'of peak':>9}"]
    for name, r in t['peers'].items():
      lines.append(f"{name:<14}{r['median_tokens_per_sec']:>10,.0f}{r['median_cpu_share']:>6.0%}"
                   f"{r['paired_ratio_vs_hf_generate']:>7.2f}x{r['paired_ratio_vs_dense_jax']:>9.2f}x"
                   f"{r['peak_share']:>9.1%}")
    lines.append('same outputs as the engine: ' + ', '.join(
        f"{n} {a['identical']:.0%} of sequences (mean common prefix {a['mean_common_prefix']:.0%})"
        for n, a in t['agreement_vs_engine'].items()))
    lines.append(f"engine: {t['engine_steps_per_run']:.0f} steps per run, "
                 f"{t['engine_host_s_per_step'] * 1e3:.1f} ms host time per step not overlapped")
    lines += limits.throughput_lines(t)
  c = report.get('capacity')
  if c:
    lines += [f"KV capacity: budget {c['kv_tokens']} tokens, requests up to {c['max_len']} tokens; "
              f"{c['requests']} requests, prompt P50/P99 {c['prompt_len_p50_p99'][0]:.0f}/"
              f"{c['prompt_len_p50_p99'][1]:.0f}, output P50/P99 {c['output_len_p50_p99'][0]:.0f}/"
              f"{c['output_len_p50_p99'][1]:.0f}",
              f"  on-demand pages: up to {c['on_demand']['max_concurrent']} sequences at once "
              f"(median {c['on_demand']['median_concurrent']}, {c['on_demand']['preemptions']} "
              f"preemptions), {c['on_demand']['tokens_per_sec']:,.0f} tokens/s",
              f"  max-length reservation: {c['reservation_max_concurrent']} at once, "
              f"{c['reservation']['tokens_per_sec']:,.0f} tokens/s",
              f"  => {c['concurrency_ratio']:.1f}x the sequences, {c['throughput_ratio']:.2f}x the "
              "throughput", '']
  b = report.get('tbt')
  if b:
    lines += [f"Time between tokens: {b['decoders']} decodes while {b['long_prompts']} prompts of "
              f"{b['long_prompt_len']} tokens arrive; budget {b['token_budget']} tokens per step",
              f"{'policy':<16}{'P50 ms':>8}{'P99 ms':>8}{'max ms':>8}"]
    for name, r in b['policies'].items():
      lines.append(f"{name:<16}{r['median_p50_s'] * 1e3:>8.0f}{r['median_p99_s'] * 1e3:>8.0f}"
                   f"{r['median_max_s'] * 1e3:>8.0f}")
    lines += [f"prefill_first P99 / chunked P99 (paired): "
              f"{b['p99_ratio_prefill_first_over_chunked']:.2f}x", '']
  s = report.get('startup')
  if s:
    lines += [f"Start-up (fresh process, every bucket compiled): cold {s['cold']['compile_s']:.1f} s, "
              f"persistent cache warm {s['warm']['compile_s']:.1f} s ({s['compile_speedup']:.1f}x); "
              f"whole process {s['cold']['process_s']:.1f} s vs {s['warm']['process_s']:.1f} s", '']
  return '\n'.join(lines + limits.table_lines(report))


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [k for k in ('throughput', 'capacity', 'tbt') if k in report]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
  for ax, key in zip(axes[0], panels):
    r = report[key]
    if key == 'throughput':
      names = list(r['peers'])
      ax.bar(names, [r['peers'][n]['median_tokens_per_sec'] for n in names])
      ax.set_ylabel('output tokens/s (median)')
      ax.set_title('throughput at saturation')
    elif key == 'capacity':
      ax.bar(['on-demand', 'reservation'], [r['on_demand']['max_concurrent'],
                                            r['reservation_max_concurrent']])
      ax.set_ylabel('sequences at once')
      ax.set_title(f"KV budget {r['kv_tokens']} tokens")
    else:
      names = list(r['policies'])
      ax.bar(names, [r['policies'][n]['median_p99_s'] * 1e3 for n in names])
      ax.set_ylabel('P99 time between tokens, ms')
      ax.set_title('mixed load')
  fig.suptitle(f"Serving engine, {report['preset']}; {report['machine']['cpu']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(args: argparse.Namespace) -> None:
  if args.startup_probe:
    startup_probe(args)
    return
  cores = args.threads or os.cpu_count()
  torch.set_num_threads(cores)
  cfg = presets.preset(args.preset, dtype='float32' if jax.default_backend() == 'cpu' else 'auto')
  if {'throughput', 'capacity', 'tbt'} & set(args.sections):
    hf_model = hf_llama(cfg, args.seed)
    params = stoker_params(cfg, hf_model)
  report = {'preset': args.preset, 'params': cfg.num_params(), 'machine': limits.machine(),
            'date': datetime.date.today().isoformat(), 'runs': args.runs, 'threads': cores,
            'load_average_before': os.getloadavg()}
  clock = Clock()
  report['probes'] = {'start': limits.probes(args, cores)}
  if 'throughput' in args.sections:
    report['throughput'] = section_throughput(args, cfg, params, hf_model, cores)
  if 'capacity' in args.sections:
    report['capacity'] = section_capacity(args, cfg, params, cores)
  if 'tbt' in args.sections:
    report['tbt'] = section_tbt(args, cfg, params, cores)
  if 'startup' in args.sections:
    report['startup'] = section_startup(args)
  limits.run_sections(report, args, cores, engine_config)  # limits, server; the end probes
  report['wall_s'] = clock.stop()[0]
  text = table(report)
  print(text)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'serve_engine.json'), 'w') as f:
    json.dump(report, f, indent=1, default=lambda o: getattr(o, 'value', str(o)))
  plot(report, os.path.join(args.out_dir, 'serve_engine.png'))
  log(f'wrote {args.out_dir}/serve_engine.{{json,png}} in {report["wall_s"]:.0f} s')


if __name__ == '__main__':
  main(ARGS)
