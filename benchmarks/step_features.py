"""What the always-present logprob and grammar-mask step inputs/outputs cost plain decoding.

  python benchmarks/step_features.py                  # tiny and small presets, ~3 min on 2 cores
  python benchmarks/step_features.py --presets small --repeats 60

The engine's compiled step (serve/step.step) always takes a grammar bitmask and two flags and
always returns per-row and per-token logprob arrays, each computed in a branch taken only when a
request asks. Peer: the same step without them (forward, then sampling: the step before issue 23),
compiled beside it from the same code and fed the same plan. Both run a decode of --seqs sequences
(no request asks for logprobs or a grammar: plain decoding), calls interleaved, median of
--repeats; ratio with / without (1.0: free). Also the host's Engine.step() on that decode, which
includes the feature checks. Both steps are compiled ahead of time (as the engine compiles) and
called in alternating order. Writes benchmarks/out/step_features.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

from _common import cpu_name, log

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--presets', default='tiny,small')
  p.add_argument('--seqs', type=int, default=16)
  p.add_argument('--context', type=int, default=128)
  p.add_argument('--repeats', type=int, default=30)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  return p.parse_args(argv)


def _plain_step(graphdef, backend, mesh, unroll, shape, params, pages, ints_I, floats_F,
                prev_tokens_B, mask_BW):
  """The step without the feature inputs and outputs (its inputs unpacked the same way)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from serve import forward as forward_lib, sampling, step as step_lib  # pylint: disable=g-import-not-at-top
  del mask_BW
  batch, feed_T, _, _, sampling_batch, _ = step_lib.unpack(ints_I, floats_F, *shape)
  fed_T = jnp.take(prev_tokens_B, jnp.maximum(feed_T, 0))
  batch = batch._replace(token_ids_T=jnp.where(feed_T >= 0, fed_T, batch.token_ids_T))
  logits_BV, pages = forward_lib.forward(graphdef, params, pages, batch, backend=backend, mesh=mesh,
                                         unroll=unroll)
  return sampling.sample(logits_BV, sampling_batch), pages


def one_preset(name: str, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import presets, transformer  # pylint: disable=g-import-not-at-top
  from serve.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from serve.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  cfg = presets.preset(name)
  params = nnx.state(jax.jit(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))())
  per_seq = -(-(args.context + 64) // 16)
  engine = Engine(cfg, params, EngineConfig(num_pages=args.seqs * per_seq + 1, page_size=16,
                                            max_seqs=args.seqs, max_pages_per_seq=per_seq,
                                            token_budget=max(args.seqs, 16), min_bucket=16,
                                            prefix_caching=False))
  log(f'{name}: engine compiled in {engine.stats["compile_s"]:.1f} s')
  for i in range(args.seqs):
    engine.add_request(f'r{i}', [(7 * i + j) % cfg.vocab_size for j in range(args.context)],
                       SamplingParams(max_tokens=60, temperature=1.0, seed=i))
  while engine.scheduler.num_waiting or not all(  # until every sequence decodes
      r.decoding for r in engine.scheduler._running):  # pylint: disable=protected-access
    engine.step()
  T = max(args.seqs, 16)
  plain = jax.jit(functools.partial(_plain_step, engine.graphdef, engine.backend, None, engine.unroll,
                                    (T, args.seqs, per_seq, 0, 0)), donate_argnums=(1,))
  host = []
  for _ in range(5):  # Engine.step() on plain decodes
    start = time.perf_counter()
    engine.step()
    host.append(time.perf_counter() - start)
  engine.step()
  inflight = engine._inflight  # pylint: disable=protected-access
  engine.scheduler.advance(inflight.plan)  # plan one more decode step to re-time
  plan = engine.scheduler.schedule()
  arrays = engine._host_arrays(plan, T)  # pylint: disable=protected-access
  full = engine._steps[T]  # pylint: disable=protected-access
  plain = plain.lower(engine.params, engine.pages, *arrays).compile()  # as the engine compiles
  times = {'with_features': [], 'without': []}
  for i in range(args.repeats):
    for key in (list(times) if i % 2 else list(times)[::-1]):
      start = time.perf_counter()
      if key == 'with_features':
        out, engine.pages = full(engine.params, engine.pages, *arrays)
      else:
        out, engine.pages = plain(engine.params, engine.pages, *arrays)
      jax.block_until_ready(out)
      times[key].append(time.perf_counter() - start)
  ratios = [a / b for a, b in zip(times['with_features'], times['without'])]
  row = {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
  row.update(ratio_with_over_without=round(statistics.median(ratios), 3),
             engine_step_ms=round(statistics.median(host) * 1e3, 3))
  log(f'{name}: {row}')
  return row


def main(argv=None) -> int:
  args = parse_args(argv)
  load = os.getloadavg()[0]
  report = {'machine': cpu_name(), 'cores': os.cpu_count(), 'loadavg_1m': load,
            'seqs': args.seqs, 'context': args.context}
  for name in args.presets.split(','):
    report[name] = one_preset(name, args)
  report['loadavg_1m_end'] = os.getloadavg()[0]
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'step_features.json'), 'w') as f:
    json.dump(report, f, indent=1)
  print(f'compiled decode step of {args.seqs} sequences at {args.context} tokens, medians of '
        f'{args.repeats} interleaved calls (load {load:.1f} -> {report["loadavg_1m_end"]:.1f}):')
  for name in args.presets.split(','):
    r = report[name]
    print(f'  {name:6s} with features {r["with_features"]:8.3f} ms, without {r["without"]:8.3f} ms, '
          f'ratio {r["ratio_with_over_without"]:.3f}; Engine.step() {r["engine_step_ms"]:.3f} ms')
  return 0


if __name__ == '__main__':
  sys.exit(main())
