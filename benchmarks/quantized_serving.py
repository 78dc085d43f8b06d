"""Quantized serving: weight memory, validation perplexity and KV capacity, int8 vs full precision.

  python benchmarks/quantized_serving.py                      # trains tiny_cpu.gin first if needed (~5 min on 2 cores)
  python benchmarks/quantized_serving.py --workdir runs/tiny  # an existing tiny-preset workdir

In one process, on the tiny preset trained briefly on the stdlib corpus (configs/train/tiny_cpu.gin):
  1. weight memory: bytes of the served params as float32, bfloat16 and int8 (EngineConfig
     weight_dtype='int8': int8 matrices + float32 per-channel scales; norms stay float32), measured
     on the arrays; the same for Llama-3-8B's shapes (abstract, nothing allocated).
  2. validation perplexity through the serving forward pass (serve/forward.py over the paged
     cache, teacher-forced one token per step, --rows validation rows, each row's first document):
     full precision, int8 weights, int8 KV cache, both, and a bfloat16 KV cache for reference.
     Goals: int8 weights within 1% of full precision, int8 KV within 2%.
  3. KV capacity: for a fixed KV budget (--kv_budget_mb), the pool that fits for float32,
     bfloat16 and int8 pages, the sequences of --prompt_len + --max_tokens tokens it holds whole,
     and the most the Engine actually runs at once when --requests such requests arrive together
     (pages are taken as tokens arrive, so it may run more and preempt some later).
Writes benchmarks/out/quantized_serving.{json,png}. CPU figures are ratios; the computation is
float32 on CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

from _common import log, set_host_devices

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', default=os.path.join('runs', 'quantized-serving-tiny'),
                 help='A tiny-preset training workdir; trained with tiny_cpu.gin if it has no checkpoint.')
  p.add_argument('--gin_param', action='append', default=[], help='Bindings for that training run.')
  p.add_argument('--rows', type=int, default=32, help='validation rows scored')
  p.add_argument('--kv_budget_mb', type=float, default=4.0)
  p.add_argument('--requests', type=int, default=48)
  p.add_argument('--prompt_len', type=int, default=96)
  p.add_argument('--max_tokens', type=int, default=32)
  p.add_argument('--host_devices', type=int, default=8)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  return p.parse_args(argv)


def first_documents(batches, rows: int):
  """(inputs, targets) of the first document of each of `rows` validation rows."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = []
  for batch in batches:
    for r in range(len(batch['inputs'])):
      seg = batch['segment_ids'][r]
      n = int(np.sum((seg == seg[0]) & (batch['loss_mask'][r] > 0)))
      if seg[0] and n >= 8:
        out.append((np.asarray(batch['inputs'][r][:n]), np.asarray(batch['targets'][r][:n])))
      if len(out) == rows:
        return out
  return out


def serving_perplexity(cfg, graphdef, params, docs, kv_dtype, page_size=16):
  """exp(mean NLL) of `docs` through the paged forward, one token of every row per step."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from serve import forward, kv_cache  # pylint: disable=g-import-not-at-top
  B, S = len(docs), max(len(d[0]) for d in docs)
  M = -(-S // page_size)
  spec = kv_cache.KVCacheSpec.for_model(cfg, 1 + B * M, page_size, kv_dtype)
  pages = kv_cache.init_pages(spec)
  step = jax.jit(functools.partial(forward.forward, graphdef), donate_argnums=(1,))
  tables = (1 + np.arange(B * M, dtype=np.int32)).reshape(B, M)
  nll, count = 0.0, 0
  for t in range(S):
    tokens = np.array([d[0][t] if t < len(d[0]) else 0 for d in docs], np.int32)
    batch = forward.StepBatch(tokens, np.full(B, t, np.int32), tables, np.full(B, t + 1, np.int32),
                              np.arange(B + 1, dtype=np.int32), np.array([B], np.int32),
                              np.arange(B, dtype=np.int32))
    logits, pages = step(params, pages, batch)
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    for b, (inputs, targets) in enumerate(docs):
      if t < len(inputs):
        nll += logz[b] - logits[b, targets[t]]
        count += 1
  return math.exp(nll / count), count


def peak_running(engine, prompts, max_tokens):
  """The most requests the engine held running at once, running `prompts` to completion."""
  from serve.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  for i, p in enumerate(prompts):
    engine.add_request(f'r{i}', p, SamplingParams(max_tokens=max_tokens))
  peak = 0
  while engine.has_work:
    engine.step()
    peak = max(peak, engine.scheduler.num_running)
  return peak


def main(argv=None) -> int:
  args = parse_args(argv)
  set_host_devices(args.host_devices)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top
  from models import checkpoint_io, presets, transformer  # pylint: disable=g-import-not-at-top
  from serve import kv_cache, quant  # pylint: disable=g-import-not-at-top
  from serve.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from train import datasets, loop  # pylint: disable=g-import-not-at-top

  train_cfg = configs.load_train_config(['train/tiny_cpu.gin'], args.gin_param)
  if not os.path.isdir(os.path.join(args.workdir, 'checkpoints')):
    log(f'Training tiny_cpu.gin ({train_cfg.steps} steps) into {args.workdir} ...')
    loop.train(train_cfg, args.workdir, progress=False)
  cfg, params = checkpoint_io.read_params(args.workdir, dtype='float32')
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))
  qparams = jax.jit(quant.quantize_params)(params)
  results = {'device': jax.devices()[0].device_kind, 'workdir': args.workdir, 'model': 'tiny',
             'params': cfg.num_params()}

  # 1. Weight memory.
  bf16 = jax.tree.map(lambda x: x.astype('bfloat16'), params)
  memory = {'float32': quant.nbytes(params), 'bfloat16': quant.nbytes(bf16),
            'int8': quant.nbytes(qparams)}
  big = quant.abstract(checkpoint_io.abstract_params(presets.preset('llama3_8b')))
  big_f32 = presets.preset('llama3_8b').num_params() * 4
  memory['llama3_8b'] = {'float32': big_f32, 'bfloat16': big_f32 // 2, 'int8': quant.nbytes(big)}
  results['weight_bytes'] = memory
  log(f"weights: float32 {memory['float32'] / 2**20:.2f} MiB, bfloat16 "
      f"{memory['bfloat16'] / 2**20:.2f} MiB, int8 {memory['int8'] / 2**20:.2f} MiB "
      f"(int8/float32 {memory['int8'] / memory['float32']:.3f}, int8/bfloat16 "
      f"{memory['int8'] / memory['bfloat16']:.3f}); llama3_8b int8 "
      f"{memory['llama3_8b']['int8'] / 2**30:.2f} GiB vs bfloat16 {big_f32 / 2 / 2**30:.2f} GiB")

  # 2. Validation perplexity through the serving forward pass.
  with datasets.validation_batches(train_cfg, datasets.data_dir(train_cfg)) as val:
    docs = first_documents(val, args.rows)
  runs = {'full': (params, 'float32'), 'int8_weights': (qparams, 'float32'),
          'int8_kv': (params, 'int8'), 'int8_both': (qparams, 'int8'),
          'bf16_kv': (params, 'bfloat16')}
  ppl = {}
  for name, (p, kv) in runs.items():
    ppl[name], tokens = serving_perplexity(cfg, graphdef, p, docs, kv)
    log(f'perplexity {name:>13}: {ppl[name]:.4f} ({tokens} tokens, {len(docs)} rows)')
  rel = {k: ppl[k] / ppl['full'] - 1 for k in ppl if k != 'full'}
  results['perplexity'] = {'values': ppl, 'relative_to_full': rel, 'tokens': tokens,
                           'goals': {'int8_weights': 0.01, 'int8_kv': 0.02},
                           'met': {'int8_weights': abs(rel['int8_weights']) <= 0.01,
                                   'int8_kv': abs(rel['int8_kv']) <= 0.02}}

  # 3. Sequences that fit a fixed KV budget.
  budget = int(args.kv_budget_mb * 2**20)
  prompts = [list(np.random.default_rng(i).integers(1, cfg.vocab_size, args.prompt_len))
             for i in range(args.requests)]
  capacity = {}
  for kv in ('float32', 'bfloat16', 'int8'):
    spec = kv_cache.KVCacheSpec.for_model(cfg, 2, 16, kv)
    pages = budget // (spec.bytes_per_token * 16)
    engine = Engine(cfg, params, EngineConfig(
        num_pages=pages + 1, page_size=16, max_seqs=args.requests,
        max_pages_per_seq=-(-(args.prompt_len + args.max_tokens) // 16), token_budget=256,
        min_bucket=64, kv_dtype=kv, prefix_caching=False))
    peak = peak_running(engine, prompts, args.max_tokens)
    whole = pages // engine.config.max_pages_per_seq  # sequences whose every token fits at once
    capacity[kv] = {'bytes_per_token': spec.bytes_per_token, 'pages': pages,
                    'tokens': pages * 16, 'whole_sequences': whole, 'peak_running': peak,
                    'preemptions': engine.stats['preemptions']}
    log(f'KV {kv:>8}: {spec.bytes_per_token} B/token, {pages} pages of 16 in '
        f'{args.kv_budget_mb} MiB: {whole} whole sequences; the engine ran up to {peak} at once '
        f"({engine.stats['preemptions']} preemptions)")
  results['kv_capacity'] = {'budget_bytes': budget, 'sequence_tokens': args.prompt_len +
                            args.max_tokens, 'by_dtype': capacity,
                            'int8_over_float32': capacity['int8']['peak_running'] /
                            capacity['float32']['peak_running'],
                            'int8_over_bfloat16': capacity['int8']['peak_running'] /
                            capacity['bfloat16']['peak_running']}

  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'quantized_serving.json'), 'w') as f:
    json.dump(results, f, indent=2)
  plot(results, os.path.join(args.out_dir, 'quantized_serving.png'))
  print(json.dumps({'weight_int8_over_float32': memory['int8'] / memory['float32'],
                    'perplexity_relative': rel,
                    'kv_peak_running': {k: v['peak_running'] for k, v in capacity.items()}},
                   indent=2))
  return 0


def plot(results, path):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    log('matplotlib is not installed: no plot.')
    return
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  mem = results['weight_bytes']
  axes[0].bar(['float32', 'bfloat16', 'int8'], [mem[k] / 2**20 for k in ('float32', 'bfloat16', 'int8')])
  axes[0].set_ylabel('MiB'), axes[0].set_title('tiny: weight memory')
  ppl = results['perplexity']['values']
  axes[1].bar(list(ppl), list(ppl.values()))
  axes[1].set_ylim(min(ppl.values()) * 0.98, max(ppl.values()) * 1.01)
  axes[1].set_title('validation perplexity (serving path)')
  axes[1].tick_params(axis='x', rotation=30)
  cap = results['kv_capacity']['by_dtype']
  axes[2].bar(list(cap), [v['peak_running'] for v in cap.values()])
  axes[2].set_title(f"sequences running in {results['kv_capacity']['budget_bytes'] / 2**20:.0f} "
                    'MiB of KV')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == '__main__':
  sys.exit(main())
