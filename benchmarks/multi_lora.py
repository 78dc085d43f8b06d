"""Multi-LoRA serving throughput: 4 adapters mixed in the engine's steps vs the base alone.

  python benchmarks/multi_lora.py                    # tiny preset, ~3 min on 2 busy cores
  python benchmarks/multi_lora.py --preset small --requests 32 --repeats 3

The same requests (--requests prompts of --prompt tokens, --max_tokens greedy tokens each, fresh
prompts per repeat so the prefix cache never helps) run through:
  base    an engine without adapter slots (EngineConfig.max_loras=0), every request on the base;
  mixed   an engine with 4 slots of rank --rank, request i on adapter i % 4 (all resident: no swaps);
  slot0   the slotted engine with every request on the base (slot 0): what the slots cost the base.
Generated tokens per second of Engine.generate, configurations interleaved, median of --repeats;
ratios against `base` in the same run (bar: mixed >= 0.8x). Also the adapter product itself
(serve/lora.MultiLoRA) two ways, jitted on one MLP weight's shape: the one-hot mask over the S * R
concatenated ranks (what the engine uses) vs gathering each token's factors. Writes
benchmarks/out/multi_lora.json. On a shared CPU the host load is printed with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

from _common import cpu_name, log

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ADAPTERS = 4


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--preset', default='tiny')
  p.add_argument('--requests', type=int, default=32)
  p.add_argument('--prompt', type=int, default=64)
  p.add_argument('--max_tokens', type=int, default=32)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  return p.parse_args(argv)


def product_timings(cfg, rank: int, repeats: int = 50) -> dict:
  """Milliseconds of x W plus the adapter product on up_DF's shape: one-hot (the engine's) vs
  gather, beside x W alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from serve.lora import MultiLoRA  # pylint: disable=g-import-not-at-top

  def gather(x_1TD, w_DF, a_SDR, b_SRF, slots_T):
    i_T = jnp.maximum(slots_T - 1, 0)
    on_T = (slots_T > 0).astype(x_1TD.dtype)
    xa_TR = jnp.einsum('TD,TDR->TR', x_1TD[0], jnp.take(a_SDR, i_T, axis=0))
    low_TF = jnp.einsum('TR,TRF->TF', xa_TR, jnp.take(b_SRF, i_T, axis=0)) * on_T[:, None]
    return jnp.einsum('BTD,DF->BTF', x_1TD, w_DF) + low_TF[None]

  def onehot(x_1TD, w_DF, a_SDR, b_SRF, slots_T):
    return MultiLoRA(w_DF, a_SDR, b_SRF, slots_T).einsum('BTD,DF->BTF', x_1TD)

  def base(x_1TD, w_DF, a_SDR, b_SRF, slots_T):  # pylint: disable=unused-argument
    return jnp.einsum('BTD,DF->BTF', x_1TD, w_DF)

  out = {}
  D, F = cfg.d_model, cfg.mlp_dim
  key = jax.random.key(0)
  w = jax.random.normal(key, (D, F))
  a = jax.random.normal(key, (ADAPTERS, D, rank))
  b = jax.random.normal(key, (ADAPTERS, rank, F))
  for T in (16, 256):
    x = jax.random.normal(key, (1, T, D))
    slots = jnp.arange(T, dtype=jnp.int32) % (ADAPTERS + 1)
    row = {}
    for name, fn in (('base', base), ('onehot', onehot), ('gather', gather)):
      f = jax.jit(fn)
      f(x, w, a, b, slots).block_until_ready()
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        f(x, w, a, b, slots).block_until_ready()
        times.append(time.perf_counter() - start)
      row[name] = round(statistics.median(times) * 1e3, 4)
    row['gather_over_onehot'] = round(row['gather'] / row['onehot'], 3)
    out[f'T{T}'] = row
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import lora, presets, transformer  # pylint: disable=g-import-not-at-top
  from serve.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from serve.sampling import SamplingParams  # pylint: disable=g-import-not-at-top

  load = os.getloadavg()
  cfg = presets.preset(args.preset)
  params = nnx.state(jax.jit(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))())
  per_seq = -(-(args.prompt + args.max_tokens) // 16)
  engine_cfg = EngineConfig(num_pages=16 * per_seq + 1, page_size=16, max_seqs=16,
                            max_pages_per_seq=per_seq, token_budget=256)
  start = time.perf_counter()
  plain = Engine(cfg, params, engine_cfg)
  slotted = Engine(cfg, params, dataclasses.replace(engine_cfg, max_loras=ADAPTERS,
                                                    max_lora_rank=args.rank))
  log(f'two engines compiled in {time.perf_counter() - start:.1f} s')
  for i in range(ADAPTERS):
    config = lora.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
    adapters = lora.init_adapters(cfg, params, config, jax.random.key(i + 1))
    adapters = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), adapters)  # b != 0
    slotted.adapters.register(f'a{i}', adapters, config)

  runs = {'base': (plain, lambda i: None), 'mixed': (slotted, lambda i: f'a{i % ADAPTERS}'),
          'slot0': (slotted, lambda i: None)}
  times = {k: [] for k in runs}
  rng = np.random.default_rng(0)
  for repeat in range(args.repeats + 1):  # the first repeat warms up (host code paths, slots)
    prompts = rng.integers(1, cfg.vocab_size, (args.requests, args.prompt)).tolist()
    order = list(runs) if repeat % 2 else list(runs)[::-1]
    for key in order:
      engine, adapter = runs[key]
      params_ = [SamplingParams(max_tokens=args.max_tokens, lora=adapter(i))
                 for i in range(args.requests)]
      start = time.perf_counter()
      outs = engine.generate(prompts, params_)
      elapsed = time.perf_counter() - start
      assert sum(map(len, outs)) == args.requests * args.max_tokens
      if repeat:
        times[key].append(elapsed)
  tokens = args.requests * args.max_tokens
  report = {'machine': cpu_name(), 'cores': os.cpu_count(), 'loadavg_start': load,
            'preset': args.preset, 'requests': args.requests, 'prompt': args.prompt,
            'max_tokens': args.max_tokens, 'rank': args.rank, 'adapters': ADAPTERS,
            'swaps': slotted.stats['lora_swaps']}
  for key, ts in times.items():
    report[key] = {'median_s': round(statistics.median(ts), 3),
                   'tokens_per_s': round(tokens / statistics.median(ts), 1)}
  for key in ('mixed', 'slot0'):
    report[f'{key}_over_base'] = round(report[key]['tokens_per_s'] / report['base']['tokens_per_s'],
                                       3)
  report['product_ms'] = product_timings(cfg, args.rank)
  report['loadavg_end'] = os.getloadavg()
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'multi_lora.json'), 'w') as f:
    json.dump(report, f, indent=1)
  print(f'{args.preset}: {args.requests} requests x ({args.prompt} prompt + {args.max_tokens} '
        f'generated) tokens, medians of {args.repeats} interleaved runs, load '
        f'{" ".join(f"{x:.1f}" for x in load)} -> {" ".join(f"{x:.1f}" for x in report["loadavg_end"])} '
        f'on {os.cpu_count()} cores:')
  for key in runs:
    print(f'  {key:6s} {report[key]["tokens_per_s"]:8.1f} tokens/s ({report[key]["median_s"]:.2f} s)')
  print(f'  mixed / base {report["mixed_over_base"]:.3f} (bar 0.8); slot0 / base '
        f'{report["slot0_over_base"]:.3f}; slot swaps {report["swaps"]}')
  for T, row in report['product_ms'].items():
    print(f'  x up_DF with adapters, {T}: base matmul alone {row["base"]:.4f} ms, with one-hot '
          f'{row["onehot"]:.4f} ms, with gather {row["gather"]:.4f} ms (gather / one-hot '
          f'{row["gather_over_onehot"]:.2f})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
