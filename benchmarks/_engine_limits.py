"""The machine's limits beside benchmarks/serve_engine.py's figures (issue 21).

  probes       the matmul peak (float32 1024 x 1024 matmuls on all cores, best of 7: the probe of
               train.flops.measure_cpu_peak_flops, timed here so that its cpu share leaves out the
               compile) and the memory bandwidth (bytes / median time of a jitted jnp.sum over
               --probe_mib MiB of float32), at the start of the run and at its end. Figures use the
               higher reading of each: the machine's limit is what it reached.
  model FLOPs  2 x matmul params per token computed (the LM head in, the embedding lookup out) +
               attention 4 x N x H x context per layer per token: forward only.
  limits       one decode step of --limits_seqs sequences at about --limits_context tokens of
               context (--limits_preset): Engine.step() and the compiled step alone, each against
               max(FLOPs / peak, bytes / bandwidth); host overhead = 1 - compiled step / step().
  server       in _engine_server.py.

Import after JAX's flags are set (serve_engine.py does). Engine._inflight, _host_arrays and
_compiled are read on purpose, as serve/sim/probe.py does: the plan in flight, the step alone.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from _common import Clock, cpu_name, log
from _engine_server import section_server, server_lines
from models import presets
from models.config import ModelConfig
from serve import quant
from serve.engine import Engine, EngineConfig
from serve.sampling import SamplingParams
from serve.sim.probe import random_params

MIN_CPU_SHARE = 0.9  # a figure from a run that had less of the cores is not a result
STEP_SPLIT = ('plan_s', 'build_s', 'wait_s', 'update_s', 'output_s', 'host_s')


# ----------------------------------------------------------------------------- probes


def machine() -> dict:
  """The host, its cores and the versions, for the report."""
  cpu = cpu_name()
  return {'cpu': cpu, 'cpu_cores': os.cpu_count(), 'jax_backend': jax.default_backend(),
          'jax_device_kind': jax.devices()[0].device_kind, 'torch_threads': torch.get_num_threads(),
          'python': platform.python_version(), 'jax': jax.__version__, 'torch': torch.__version__,
          'transformers': transformers.__version__}


def _timed(fn, repeats: int, cores: int) -> tuple[list[float], float]:
  """Seconds of each of `repeats` calls of fn (after one untimed call), and their cpu share."""
  jax.block_until_ready(fn())
  times, clock = [], Clock()
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times, clock.stop(cores)[1]


def probe_peak(cores: int, n: int = 1024, repeats: int = 7) -> dict:
  """Best float32 n x n matmul FLOP/s of the default device (train.flops' CPU probe)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  times, share = _timed(lambda: matmul(a), repeats, cores)
  return {'flops_per_s': 2 * n**3 / min(times), 'cpu_share': share, 'n': n}


def probe_bandwidth(cores: int, nbytes: int, repeats: int = 7) -> dict:
  """Bytes / median seconds of a jitted sum over nbytes of float32: every byte read once."""
  x = jax.jit(lambda: jnp.ones(nbytes // 4, jnp.float32))()
  total = jax.jit(jnp.sum)
  times, share = _timed(lambda: total(x), repeats, cores)
  size = x.nbytes
  x.delete()
  return {'bytes_per_s': size / statistics.median(times), 'cpu_share': share, 'bytes': size}


def probes(args, cores: int) -> dict:
  out = {'matmul': probe_peak(cores), 'bandwidth': probe_bandwidth(cores, args.probe_mib << 20)}
  log(f"[probes] matmul {out['matmul']['flops_per_s'] / 1e9:,.0f} GFLOP/s, memory "
      f"{out['bandwidth']['bytes_per_s'] / 1e9:,.1f} GB/s")
  return out


def probe_now(cores: int, nbytes: int = 1 << 30, when: str = 'start') -> str:
  """The probes taken now, as probe_line writes them, labelled `when` ('start' or 'end' of a run; a
  matmul's cpu share under 90%: something else ran on the host, and the figures beside it are not results)."""
  return probe_line({'probes': {when: {'matmul': probe_peak(cores),
                                       'bandwidth': probe_bandwidth(cores, nbytes)}}})


def machine_limits(report: dict) -> tuple[float, float]:
  """(peak FLOP/s, bandwidth bytes/s): the higher reading of the start and end probes."""
  taken = [report['probes'][k] for k in ('start', 'end') if k in report['probes']]
  return (max(p['matmul']['flops_per_s'] for p in taken),
          max(p['bandwidth']['bytes_per_s'] for p in taken))


# ----------------------------------------------------------------------------- model FLOPs


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that multiply activations: all but the embedding table (a lookup; with tied
  embeddings it is also the LM head, which counts), norm scales and biases."""
  D, L, N, K, H = cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  embed = 0 if cfg.tie_embeddings else cfg.vocab_size * D
  norms = (2 * L + 1) * D + (2 * H * L if cfg.qk_norm else 0)
  biases = (N * H + 2 * K * H) * L if cfg.qkv_bias else 0
  return cfg.num_params() - embed - norms - biases


def forward_flops(cfg: ModelConfig, contexts) -> float:
  """Model FLOPs of one forward pass over len(contexts) tokens, token i attending to contexts[i]
  positions (itself included): 2 x matmul params per token, the LM head on every token (as
  training's MFU counts it; a serving step needs it only where it samples), plus the attention
  score and value matmuls, 4 x N x H x context per layer."""
  contexts = np.asarray(contexts, np.float64)
  attention = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * contexts.sum()
  return 2.0 * matmul_params(cfg) * contexts.size + float(attention)


def generate_flops(cfg: ModelConfig, prompt_lens, max_tokens: int) -> float:
  """Model FLOPs of generating max_tokens tokens after each prompt. A prompt of p tokens computes
  positions 0 .. p + max_tokens - 2 (the last token sampled is never fed back), position i
  attending to i + 1 positions."""
  return sum(forward_flops(cfg, np.arange(1, p + max_tokens)) for p in prompt_lens)


def step_split(before: dict, after: dict) -> dict:
  """Engine.stats deltas in ms per step (keys an engine does not keep read as 0): planning,
  building and dispatching, waiting for the device, applying tokens, outputs, all of step()."""
  steps = after.get('steps', 0) - before.get('steps', 0)
  split = {k[:-2]: 1e3 * (after.get(k, 0.0) - before.get(k, 0.0)) / max(steps, 1)
           for k in STEP_SPLIT}
  return {'steps': steps, **split}


# ----------------------------------------------------------------------------- limits


def _decoding(engine: Engine, seqs: int) -> bool:
  """Whether the step in flight decodes `seqs` sequences and nothing else."""
  inflight = engine._inflight  # pylint: disable=protected-access
  return inflight is not None and len(inflight.plan.seqs) == seqs == inflight.plan.num_tokens


def _kv_lens(engine: Engine) -> list[int]:
  plan = engine._inflight.plan  # pylint: disable=protected-access
  return [s.start_pos + len(s.token_ids) for s in plan.seqs]


def time_engine_steps(engine: Engine, steps: int, cores: int) -> tuple[float, float]:
  """Seconds per Engine.step() over `steps` steady steps, and their cpu share. One untimed step
  first: the step in flight may have finished while the compiled step was timed alone."""
  engine.step()
  before, clock = engine.stats['steps'], Clock()
  for _ in range(steps):
    engine.step()
  wall, share = clock.stop(cores)
  if engine.stats['steps'] - before != steps:
    raise RuntimeError(f'limits: {steps} step() calls dispatched {engine.stats["steps"] - before}.')
  return wall / steps, share


def time_compiled_step(engine: Engine, steps: int, cores: int) -> tuple[float, float]:
  """Seconds per call of the compiled step alone on the plan in flight, dispatched back to back
  (the pools it donates kept in engine.pages); its cpu share. It rewrites the K/V of the plan's
  positions from token 0, which changes later tokens but not the work of any step."""
  plan = engine._inflight.plan  # pylint: disable=protected-access
  T = next(b for b in engine.config.buckets() if b >= plan.num_tokens)
  arrays = engine._host_arrays(plan, T)  # pylint: disable=protected-access
  compiled = engine._compiled[T]  # pylint: disable=protected-access
  tokens, engine.pages = compiled(engine.params, engine.pages, *arrays)
  tokens.block_until_ready()  # also waits out the step in flight
  clock = Clock()
  for _ in range(steps):
    tokens, engine.pages = compiled(engine.params, engine.pages, *arrays)
  tokens.block_until_ready()
  wall, share = clock.stop(cores)
  return wall / steps, share


def section_limits(args, cores: int) -> dict:
  cfg = presets.preset(args.limits_preset, dtype='float32' if jax.default_backend() == 'cpu'
                       else 'auto')
  B, n, G = args.limits_seqs, args.limits_steps, 16
  if B >= 256:
    raise ValueError(f'--limits_seqs={B}: the step budget is 256 tokens; decode fewer sequences.')
  # Chunked prefill: the first prompts decode while later ones prefill, so each sequence samples
  # up to `prefill` tokens before the batch decodes whole, then `decodes` more (the compiled step
  # alone adds none). Contexts grow a token a step: prompts are cut to centre them on the target.
  prefill = -(-B * args.limits_context // (256 - B)) + 2
  decodes = 4 + args.runs * (n + 1)
  prompt = max(1, args.limits_context - (prefill + decodes) // 2)
  M = -(-(prompt + prefill + decodes + 2) // G)
  ecfg = EngineConfig(max_seqs=B, page_size=G, token_budget=256, prefix_caching=False,
                      num_pages=(B + 1) * M + 1, max_pages_per_seq=M, weight_layout=args.weight_layout)
  engine = Engine(cfg, random_params(cfg, args.seed), ecfg)
  log(f'[limits] {args.limits_preset} engine compiled in {engine.stats["compile_s"]:.1f} s')
  rng = np.random.default_rng(args.seed + 4)
  for i in range(B):
    engine.add_request(f'limits{i}', rng.integers(1, cfg.vocab_size, prompt).tolist(),
                       SamplingParams(max_tokens=prefill + decodes + 2))
  for _ in range(2 * B * prompt):  # prefill, until every sequence decodes
    engine.step()
    if _decoding(engine, B):
      break
  else:
    raise RuntimeError(f'limits: the engine never decoded {B} sequences at once.')
  for _ in range(3):  # on a CPU the first decodes after a 256-token step run slower
    engine.step()
  timers = {'engine_step': time_engine_steps, 'jitted_step': time_compiled_step}
  res = {k: {'seconds': [], 'cpu_share': []} for k in timers}
  contexts = []
  for r in range(args.runs):
    for name in (list(timers) if r % 2 == 0 else list(timers)[::-1]):
      before = np.mean(_kv_lens(engine))
      seconds, share = timers[name](engine, n, cores)
      contexts.append((before + np.mean(_kv_lens(engine))) / 2)
      res[name]['seconds'].append(seconds)
      res[name]['cpu_share'].append(share)
      if not _decoding(engine, B):
        raise RuntimeError('limits: the batch changed while timing; raise --limits_context.')
    log(f'[limits] run {r + 1}/{args.runs}: ' + ', '.join(
        f'{k} {v["seconds"][-1] * 1e3:.1f} ms' for k, v in res.items()))
  context = float(np.mean(contexts))
  itemsize = jnp.dtype(cfg.param_dtype).itemsize
  weights = quant.nbytes(engine.params)
  kv = engine.kv_spec.bytes_per_token * B * context
  for v in res.values():
    v['median_s'] = statistics.median(v['seconds'])
    v['median_cpu_share'] = statistics.median(v['cpu_share'])
  overhead = [1 - j / e for e, j in zip(res['engine_step']['seconds'],
                                        res['jitted_step']['seconds'])]
  return {'preset': args.limits_preset, 'params': cfg.num_params(), 'seqs': B,
          'prompt_len': prompt, 'mean_context': context, 'steps_per_run': n,
          'engine_config': dataclasses.asdict(ecfg), 'compile_s': engine.stats['compile_s'],
          'flops': forward_flops(cfg, np.full(B, context)), 'weight_bytes': weights,
          'embedding_bytes': 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model * itemsize,
          'kv_bytes': kv, 'bytes': weights + kv, 'host_overhead': overhead,
          'median_host_overhead': statistics.median(overhead), **res}


# ----------------------------------------------------------------------------- report


def run_sections(report: dict, args, cores: int, engine_config) -> None:
  """The sections of this module that args.sections names, the end probes, then finish()."""
  if 'limits' in args.sections:
    report['limits'] = section_limits(args, cores)
  if 'server' in args.sections:
    report['server'] = section_server(args, cores, engine_config)
  report['probes']['end'] = probes(args, cores)
  finish(report)


def table_lines(report: dict) -> list[str]:
  """The limits and server blocks of the table, then every WARNING."""
  lines = limits_lines(report['limits']) if 'limits' in report else []
  lines += server_lines(report['server']) if 'server' in report else []
  return lines + warnings(report)


def finish(report: dict) -> None:
  """Adds the figures that need the probes: shares of the peak, the decode step's roofline."""
  peak, bandwidth = machine_limits(report)
  t = report.get('throughput')
  if t:
    for r in t['peers'].values():
      r['median_seconds'] = statistics.median(r['seconds'])
      r['peak_share'] = t['model_flops'] / r['median_seconds'] / peak
  lim = report.get('limits')
  if lim:
    lim['compute_s'], lim['memory_s'] = lim['flops'] / peak, lim['bytes'] / bandwidth
    lim['limit_s'] = max(lim['compute_s'], lim['memory_s'])
    lim['bound'] = 'compute' if lim['compute_s'] >= lim['memory_s'] else 'memory'
    for name in ('engine_step', 'jitted_step'):
      lim[name]['over_limit'] = lim[name]['median_s'] / lim['limit_s']


def probe_line(report: dict) -> str:
  """The probes for the table's header: start / end readings, each with its cpu share."""
  when = [k for k in ('start', 'end') if k in report['probes']]
  taken = [report['probes'][k] for k in when]
  mm = ' / '.join(f"{p['matmul']['flops_per_s'] / 1e9:,.0f}" for p in taken)
  bw = ' / '.join(f"{p['bandwidth']['bytes_per_s'] / 1e9:,.1f}" for p in taken)
  mm_cpu = ' / '.join(f"{p['matmul']['cpu_share']:.0%}" for p in taken)
  bw_cpu = ' / '.join(f"{p['bandwidth']['cpu_share']:.0%}" for p in taken)
  return (f"probes ({' / '.join(when)}): matmul peak {mm} GFLOP/s (cpu {mm_cpu}), memory "
          f"bandwidth {bw} GB/s (jnp.sum over {taken[0]['bandwidth']['bytes'] / 2**30:.2g} GiB, "
          f"cpu {bw_cpu})")


def throughput_lines(t: dict) -> list[str]:
  s = t['engine_step_split_ms']
  return [f"of peak: model FLOPs ({t['model_flops'] / 1e9:,.1f} G: 2 x matmul params per token "
          "computed, LM head in, + attention) / median seconds / matmul peak",
          f"engine per step over the timed runs ({s['steps']} steps): plan {s['plan']:.2f} ms, "
          f"build+dispatch {s['build']:.2f}, wait for device {s['wait']:.2f}, update "
          f"{s['update']:.2f}, outputs {s['output']:.2f}; all of step() {s['host']:.2f} ms", '']


def limits_lines(lim: dict) -> list[str]:
  ms = lambda s: f'{s * 1e3:.2f} ms'
  lines = [f"Decode step at the machine's limit: {lim['preset']} ({lim['params'] / 1e6:.0f}M), "
           f"{lim['seqs']} sequences decoding at contexts of {lim['mean_context']:.0f} tokens "
           f"(mean), medians of {len(lim['host_overhead'])} runs of {lim['steps_per_run']} steps",
           f"  FLOPs {lim['flops'] / 1e9:.2f} G at the peak: {ms(lim['compute_s'])}; bytes "
           f"{lim['bytes'] / 1e6:,.0f} MB (weights {lim['weight_bytes'] / 1e6:,.0f}, of which the "
           f"embedding table {lim['embedding_bytes'] / 1e6:,.0f}; K/V {lim['kv_bytes'] / 1e6:,.0f})"
           f" at the bandwidth: {ms(lim['memory_s'])}; limit {ms(lim['limit_s'])} "
           f"({lim['bound']}-bound)"]
  for name, label in (('engine_step', 'Engine.step()'), ('jitted_step', 'compiled step alone')):
    r = lim[name]
    lines.append(f"  {label:<20}{ms(r['median_s']):>11}  {r['over_limit']:.2f}x the limit "
                 f"(acceptance <= 1.5x)  cpu {r['median_cpu_share']:.0%}")
  lines.append(f"  host overhead (1 - compiled step / step()): {lim['median_host_overhead']:.1%} "
               "(acceptance <= 5%)")
  return lines + ['']


def warnings(report: dict) -> list[str]:
  """One WARNING per figure measured in a run that had under MIN_CPU_SHARE of the cores."""
  if jax.default_backend() != 'cpu':
    return []
  low = []
  for when, p in report['probes'].items():
    low += [(f'{k} probe ({when})', p[k]['cpu_share']) for k in ('matmul', 'bandwidth')]
  for name, r in report.get('throughput', {}).get('peers', {}).items():
    low += [(f'throughput {name}', s) for s in r['cpu_share']]
  for name in ('on_demand', 'reservation'):
    if name in report.get('capacity', {}):
      low.append((f'capacity {name}', report['capacity'][name]['cpu_share']))
  for name, r in report.get('tbt', {}).get('policies', {}).items():
    low += [(f'tbt {name}', s) for s in r.get('cpu_share', [])]
  lim = report.get('limits', {})
  low += [(f'limits {k}', s) for k in ('engine_step', 'jitted_step') for s in lim.get(k, {}).get(
      'cpu_share', ())]
  runs = report.get('server', {}).get('runs', {})
  low += [('server (server + client processes)', r['server_cpu_share'] + r['client_cpu_share'])
          for r in runs.get('server', ())]
  low += [('server section, Engine.generate', r['cpu_share']) for r in runs.get('generate', ())]
  worst = {}
  for name, share in low:
    if share < MIN_CPU_SHARE:
      worst[name] = min(share, worst.get(name, 1.0))
  return [f'WARNING: {name}: a run had {share:.1%} of the cores (< {MIN_CPU_SHARE:.0%}): the host '
          'was busy; that figure is not a result.' for name, share in worst.items()]
