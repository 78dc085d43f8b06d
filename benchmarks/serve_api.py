"""The server's host-side text work (issue 23): detokenization per token, and the event loop's stall
while a 100 KB prompt is tokenized and rendered.

  python benchmarks/serve_api.py            # ~1 min on 2 CPU cores
  python benchmarks/serve_api.py --repeats 9 --tokens 8000

detokenization  One output of --tokens tokens (a byte-level BPE trained here on the standard
                library's source, --vocab tokens), pushed one token at a time through
                serve.text.TextStream with two stop strings (what the server and Engine._hits_stop
                do per token), against the peer it replaced: decoding the whole output at every
                token. Host time per token, median over --repeats, in windows of 100 tokens at
                token 100 and at the end; ratio end / start (flat: 1.0; acceptance: within 20%).
event loop      An asyncio loop runs a lag probe (a 1 ms sleep; its lateness is the stall) while a
                100 KB prompt goes through what a request does: the body parsed (on the loop, as
                FastAPI does), the chat template rendered and the text tokenized, both off the loop
                (serve.routes.off_loop), and a /v1/completions string prompt tokenized. Peers: the
                same on the loop (the server before), and the loop idle for as long (the machine's
                own scheduling noise: on a loaded host it alone stalls a loop for milliseconds).
                Largest stall, median over --repeats (acceptance: below 20 ms off the loop).
Writes benchmarks/out/serve_api.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import statistics
import sys
import time
import types

from _common import cpu_name, log

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WINDOW = 100


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--tokens', type=int, default=4000, help='output length (tokens)')
  p.add_argument('--vocab', type=int, default=8192, help='BPE vocabulary trained for the test')
  p.add_argument('--prompt_kb', type=int, default=100, help='the event-loop test prompt, KB')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  args = p.parse_args(argv)
  if args.tokens < 3 * WINDOW:
    p.error(f'--tokens {args.tokens}: give at least {3 * WINDOW}.')
  return args


def corpus() -> str:
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), '*.py')))
  return '\n'.join(open(f, encoding='utf-8').read() for f in files[:60])


def per_token_times(push, ids: list[int]) -> list[float]:
  """Seconds each push of one token took."""
  out = []
  for t in ids:
    start = time.perf_counter()
    push(t)
    out.append(time.perf_counter() - start)
  return out


def detokenization(codec, text: str, args) -> dict:
  from serve.text import TextStream  # pylint: disable=g-import-not-at-top
  ids = codec.encode(text)[:args.tokens]
  if len(ids) < args.tokens:
    raise ValueError(f'the corpus encodes to {len(ids)} tokens; ask for fewer --tokens.')
  stops = ('\n\n\n\n\n', 'NEVER SEEN')
  early, late = slice(WINDOW, 2 * WINDOW), slice(len(ids) - WINDOW, len(ids))
  rows = {'incremental': [], 'full_decode': []}
  curves = {}
  for r in range(args.repeats):
    stream = TextStream(codec.decode, stops)
    times = per_token_times(lambda t: stream.push((t,)), ids)
    assert stream.sent + stream.push((), final=True) == codec.decode(ids)  # the same text
    rows['incremental'].append((statistics.mean(times[early]), statistics.mean(times[late])))
    done: list[int] = []

    def full(t):
      done.append(t)
      decoded = codec.decode(done)
      return any(s in decoded for s in stops)
    # The peer only at the two windows (its cost at a position does not depend on the others).
    early_t = per_token_times(full, ids[:early.stop])[early]
    done[:] = ids[:late.start]
    late_t = per_token_times(full, ids[late])
    rows['full_decode'].append((statistics.mean(early_t), statistics.mean(late_t)))
    if r == 0:
      curves['incremental'] = times
    log(f'detokenization repeat {r + 1}/{args.repeats}')
  out = {}
  for name, pairs in rows.items():
    e = statistics.median(p[0] for p in pairs)
    l = statistics.median(p[1] for p in pairs)
    out[name] = {'us_per_token_at_100': round(e * 1e6, 2),
                 f'us_per_token_at_{len(ids) - WINDOW}': round(l * 1e6, 2),
                 'ratio_end_over_start': round(l / e, 3)}
  out['curve_us'] = [round(x * 1e6, 2) for x in curves['incremental']]
  return out


async def _lag_while(work) -> tuple[float, float]:
  """(largest stall of a 1 ms sleep loop, seconds of work) while `work()` is awaited."""
  worst, running = 0.0, True

  async def probe():
    nonlocal worst
    while running:
      start = time.perf_counter()
      await asyncio.sleep(0.001)
      worst = max(worst, time.perf_counter() - start - 0.001)

  task = asyncio.create_task(probe())
  await asyncio.sleep(0.02)
  worst = 0.0
  start = time.perf_counter()
  await work()
  took = time.perf_counter() - start
  await asyncio.sleep(0.01)
  running = False
  await task
  return worst, took


def event_loop(codec, text: str, args) -> dict:
  from serve import routes  # pylint: disable=g-import-not-at-top
  from serve.api import ChatCompletionRequest, CompletionRequest  # pylint: disable=g-import-not-at-top
  from data.chat import ChatTemplate  # pylint: disable=g-import-not-at-top
  prompt = (text * (1 + args.prompt_kb * 1024 // len(text)))[:args.prompt_kb * 1024]
  loaded = types.SimpleNamespace(codec=codec, chat=ChatTemplate())
  chat_body = json.dumps({'model': 'm', 'messages': [{'role': 'user', 'content': prompt}]})
  completion_body = json.dumps({'model': 'm', 'prompt': prompt})

  async def off_loop():
    body = ChatCompletionRequest.model_validate_json(chat_body)
    ids = await routes.off_loop(routes.render_and_encode, loaded, routes._messages(body))  # pylint: disable=protected-access
    c = CompletionRequest.model_validate_json(completion_body)
    ids2 = await routes.off_loop(codec.encode, c.prompt)
    return len(ids) + len(ids2)

  async def on_loop():
    body = ChatCompletionRequest.model_validate_json(chat_body)
    ids = routes.render_and_encode(loaded, routes._messages(body))  # pylint: disable=protected-access
    c = CompletionRequest.model_validate_json(completion_body)
    return len(ids) + len(codec.encode(c.prompt))

  rows = {'off_loop': [], 'on_loop': [], 'idle': []}
  for r in range(args.repeats):
    for name, work in (('off_loop', off_loop), ('on_loop', on_loop)):
      rows[name].append(asyncio.run(_lag_while(work)))
    idle_s = rows['off_loop'][-1][1]
    rows['idle'].append(asyncio.run(_lag_while(lambda: asyncio.sleep(idle_s))))
    log(f'event loop repeat {r + 1}/{args.repeats}')
  out = {'prompt_bytes': len(prompt.encode()), 'prompt_tokens': len(codec.encode(prompt))}
  for name, pairs in rows.items():
    out[name] = {'max_stall_ms': round(statistics.median(p[0] for p in pairs) * 1e3, 2),
                 'work_ms': round(statistics.median(p[1] for p in pairs) * 1e3, 2)}
  out['stall_ratio_off_over_on'] = round(out['off_loop']['max_stall_ms'] /
                                         max(out['on_loop']['max_stall_ms'], 1e-6), 3)
  return out


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  curve = report['detokenization'].pop('curve_us')
  fig, ax = plt.subplots(figsize=(7, 3.5))
  width = 50
  smooth = [statistics.median(curve[i:i + width]) for i in range(0, len(curve) - width, width)]
  ax.plot([i * width for i in range(len(smooth))], smooth, label='TextStream (incremental)')
  d = report['detokenization']['full_decode']
  ends = [WINDOW, len(curve) - WINDOW]
  ax.plot(ends, list(d.values())[:2], 'o--', label='full decode per token (peer)')
  ax.set_xlabel('output token')
  ax.set_ylabel('host µs per token (median of 50)')
  ax.set_yscale('log')
  ax.legend()
  ax.set_title('Detokenization cost per token')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  args = parse_args(argv)
  from data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from serve.text import Codec  # pylint: disable=g-import-not-at-top
  text = corpus()
  log(f'training a {args.vocab}-token BPE on {len(text) // 1024} KB of stdlib source')
  codec = Codec(tokenizer_lib.train_bpe([text], args.vocab))
  load = os.getloadavg()[0]
  report = {'machine': cpu_name(), 'cores': os.cpu_count(), 'loadavg_1m': load,
            'detokenization': detokenization(codec, text, args),
            'event_loop': event_loop(codec, text, args)}
  report['loadavg_1m_end'] = os.getloadavg()[0]
  os.makedirs(args.out_dir, exist_ok=True)
  plot(report, os.path.join(args.out_dir, 'serve_api.png'))
  with open(os.path.join(args.out_dir, 'serve_api.json'), 'w') as f:
    json.dump(report, f, indent=1)
  d, e = report['detokenization'], report['event_loop']
  print(f'detokenization, host µs per token (token {WINDOW} -> token {args.tokens - WINDOW}):')
  for name in ('incremental', 'full_decode'):
    values = list(d[name].values())
    print(f'  {name:12s} {values[0]:8.2f} -> {values[1]:8.2f}   end/start {values[2]:.3f}')
  print(f'event loop, {e["prompt_bytes"] // 1024} KB prompt ({e["prompt_tokens"]} tokens), '
        'largest stall of a 1 ms probe:')
  for name in ('off_loop', 'on_loop', 'idle'):
    print(f'  {name:12s} {e[name]["max_stall_ms"]:8.2f} ms  (work {e[name]["work_ms"]:.1f} ms)')
  print(f'  off/on {e["stall_ratio_off_over_on"]:.3f}; load average {load:.1f} -> '
        f'{report["loadavg_1m_end"]:.1f} on {report["cores"]} cores')
  return 0


if __name__ == '__main__':
  sys.exit(main())
