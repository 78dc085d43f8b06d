"""Grammar-constrained decoding (response_format json_schema) vs free decoding: engine throughput.

  python benchmarks/structured_decoding.py            # tiny preset, ~2 min on 2 CPU cores
  python benchmarks/structured_decoding.py --preset small --runs 5

One process, one random model (--preset) and a byte-level BPE trained here on the standard
library's source (--vocab tokens, at most the model's vocabulary). Each run sends --requests
requests at temperature 1 (max_seqs --batch) three ways, interleaved run after run:
  constrained     a JSON schema (nested objects, arrays with maxItems, enums, bounded integers and
                  strings) through serve/grammar.py: each step's bitmask filled from the matchers,
                  applied on device, and stepping synchronous for the steps after a constrained
                  sample (the mask needs the token);
  free            no grammar, each request generating exactly as many tokens as its constrained
                  twin did (the same work), overlapped (async) scheduling as served;
  free_sync       the same with EngineConfig.async_scheduling off: what synchronous stepping alone
                  costs, apart from the masks.
Output tokens per second, medians over --runs; ratios constrained / free and constrained /
free_sync; the host time per step spent filling masks (Engine.stats mask_s). Writes
benchmarks/out/structured_decoding.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import sys
import time

from _common import Clock, cpu_name, log

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {
    'type': 'object', 'additionalProperties': False, 'required': ['id', 'name', 'tags', 'dims'],
    'properties': {
        'id': {'type': 'integer', 'minimum': 0, 'maximum': 100000},
        'name': {'type': 'string', 'maxLength': 12},
        'kind': {'enum': ['alpha', 'beta', 'gamma']},
        'ok': {'type': 'boolean'},
        'tags': {'type': 'array', 'maxItems': 4, 'items': {'type': 'string', 'maxLength': 6}},
        'dims': {'type': 'object', 'additionalProperties': False, 'required': ['w', 'h'],
                 'properties': {'w': {'type': 'integer', 'minimum': 0, 'maximum': 999},
                                'h': {'type': 'integer', 'minimum': 0, 'maximum': 999}}},
    }}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--preset', default='tiny')
  p.add_argument('--vocab', type=int, default=4096, help='BPE vocabulary (<= the model vocabulary)')
  p.add_argument('--requests', type=int, default=32)
  p.add_argument('--batch', type=int, default=16, help='EngineConfig.max_seqs')
  p.add_argument('--max_tokens', type=int, default=160)
  p.add_argument('--runs', type=int, default=3)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  return p.parse_args(argv)


def timed(engine, prompts, params):
  """(outputs, seconds, cpu share, mask seconds) of engine.generate."""
  before = dict(engine.stats)
  clock = Clock()
  outputs = engine.generate(prompts, params)
  wall, share = clock.stop(os.cpu_count() or 1)
  return outputs, wall, share, engine.stats['mask_s'] - before['mask_s'], \
      engine.stats['steps'] - before['steps']


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from models import presets, transformer  # pylint: disable=g-import-not-at-top
  from serve import grammar as grammar_lib  # pylint: disable=g-import-not-at-top
  from serve.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from serve.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  from serve.text import Codec  # pylint: disable=g-import-not-at-top

  cfg = presets.preset(args.preset)
  if args.vocab > cfg.vocab_size:
    raise ValueError(f'--vocab {args.vocab} exceeds the {args.preset} vocabulary {cfg.vocab_size}.')
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), '*.py')))[:40]
  text = '\n'.join(open(f, encoding='utf-8').read() for f in files)
  codec = Codec(tokenizer_lib.train_bpe([text], args.vocab))
  log(f'{args.preset}: {cfg.num_params() / 1e6:.1f}M params; BPE of {args.vocab} tokens')
  params = nnx.state(jax.jit(lambda: transformer.Transformer(cfg, nnx.Rngs(args.seed)))())
  pages = args.batch * -(-(32 + args.max_tokens) // 16) + 1
  engine_cfg = EngineConfig(num_pages=pages, page_size=16, max_seqs=args.batch,
                            max_pages_per_seq=-(-(32 + args.max_tokens) // 16), token_budget=256,
                            prefix_caching=False)
  engine = Engine(cfg, params, engine_cfg, detokenize=codec.decode)
  log(f'engine compiled in {engine.stats["compile_s"]:.1f} s')
  start = time.perf_counter()
  grammar = grammar_lib.json_schema(codec, cfg.vocab_size, SCHEMA)
  compile_grammar_s = time.perf_counter() - start
  prompts = [codec.encode(f'record {i}: ') for i in range(args.requests)]
  constrained = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=args.seed + i,
                                grammar=grammar) for i in range(args.requests)]
  engine.generate(prompts[:2], constrained[:2])  # warm-up (the tokenizer's first matchers)
  rows = {'constrained': [], 'free': [], 'free_sync': []}
  complete = []
  for run in range(args.runs):
    outputs, wall, share, mask_s, steps = timed(engine, prompts, constrained)
    tokens = sum(map(len, outputs))
    complete.append(sum(len(o) < args.max_tokens for o in outputs))
    rows['constrained'].append((tokens / wall, share, 1e3 * mask_s / max(steps, 1)))
    free = [SamplingParams(max_tokens=len(o), temperature=1.0, seed=args.seed + i)
            for i, o in enumerate(outputs)]
    for name, overlap in (('free', True), ('free_sync', False)):
      engine.config = dataclasses.replace(engine.config, async_scheduling=overlap)
      got, wall, share, _, _ = timed(engine, prompts, free)
      assert sum(map(len, got)) == tokens  # the same work
      rows[name].append((tokens / wall, share, 0.0))
    engine.config = dataclasses.replace(engine.config, async_scheduling=True)
    log(f'run {run + 1}/{args.runs}: ' + ', '.join(f'{k} {v[-1][0]:.0f} tok/s' for k, v in rows.items()))
  for o in outputs:
    if len(o) < args.max_tokens:
      json.loads(codec.decode(o))  # complete outputs parse (validated in tests/serve/test_grammar.py)
  report = {'machine': cpu_name(), 'cores': os.cpu_count(), 'loadavg_1m': os.getloadavg()[0],
            'preset': args.preset, 'requests': args.requests, 'batch': args.batch,
            'grammar_compile_s': round(compile_grammar_s, 4),
            'complete_within_max_tokens': complete,
            'mean_output_tokens': round(tokens / args.requests, 1)}
  for name, values in rows.items():
    report[name] = {'tokens_per_s': round(statistics.median(v[0] for v in values), 1),
                    'cpu_share': round(statistics.median(v[1] for v in values), 2)}
  report['constrained']['mask_ms_per_step'] = round(statistics.median(v[2] for v in rows['constrained']), 3)
  for peer in ('free', 'free_sync'):
    ratios = [c[0] / f[0] for c, f in zip(rows['constrained'], rows[peer])]
    report[f'ratio_constrained_over_{peer}'] = round(statistics.median(ratios), 3)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'structured_decoding.json'), 'w') as f:
    json.dump(report, f, indent=1)
  print(f'{args.preset}, {args.requests} requests at temperature 1, batch {args.batch}, '
        f'{report["mean_output_tokens"]} output tokens each (load {report["loadavg_1m"]:.1f}):')
  for name in rows:
    print(f'  {name:12s} {report[name]["tokens_per_s"]:9.1f} tok/s  cpu share {report[name]["cpu_share"]}')
  print(f'  constrained / free {report["ratio_constrained_over_free"]:.3f}, constrained / free_sync '
        f'{report["ratio_constrained_over_free_sync"]:.3f}; masks {report["constrained"]["mask_ms_per_step"]} '
        f'ms per step; grammar compiled in {compile_grammar_s * 1e3:.1f} ms')
  return 0


if __name__ == '__main__':
  sys.exit(main())
