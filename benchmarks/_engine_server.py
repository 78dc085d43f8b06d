"""benchmarks/serve_engine.py's `server` section: `stoker serve` at saturation vs Engine.generate.

A real `stoker serve --hf-dir` process on a free loopback port serves the --limits_preset model with
random weights, written as a Hugging Face directory with a word-level tokenizer of one word per id
(every id decodes to text). serve.bench's client (what `stoker bench` drives) sends
--server_requests token-id prompts at once with ignore_eos, so each generates exactly
--server_max_tokens tokens; Engine.generate in this process runs the same prompts with the same
EngineConfig (every field passed to the server as an engine.* gin binding). Runs alternate between
the two. The server's CPU time is its whole process's (/proc/<pid>/stat utime + stime: the HTTP
layer, the engine's driver thread and XLA's threads), nothing subtracted.
Import after JAX's flags are set (serve_engine.py does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import tempfile

import jax
import numpy as np
import tokenizers
from flax import nnx

from _common import Clock, log
from models import hf_files, presets
from serve.bench import client
from serve.bench.workload import RequestSpec
from serve.engine import Engine, EngineConfig
from serve.sampling import SamplingParams
from serve.sim.probe import random_params
from serve_bench import REPO, free_port, stoker, wait_healthy


def write_tokenizer(path: str, vocab_size: int) -> None:
  """A word-level tokenizer.json with one word per id ('t0' ...), so every id decodes to text."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {f't{i}': i for i in range(vocab_size)}, unk_token='t0'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(path)


def gin_value(v) -> str:
  """A gin literal: enums by value, strings double-quoted (readable inside a shell command)."""
  v = getattr(v, 'value', v)
  return json.dumps(v) if isinstance(v, str) else repr(v)


def proc_cpu_s(pid: int) -> float:
  """User + system CPU seconds of process `pid`, all its threads (Linux /proc/<pid>/stat)."""
  with open(f'/proc/{pid}/stat') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def served(endpoint, prompts, max_tokens: int, pid: int, cores: int) -> dict:
  """Every prompt (token ids: the completions API takes them as `prompt`) sent at once through
  serve.bench's client; wall time and CPU of both sides."""
  specs = [RequestSpec(i, 0.0, len(p), max_tokens) for i, p in enumerate(prompts)]
  start_cpu, clock = proc_cpu_s(pid), Clock()
  records, _ = asyncio.run(client.run_requests(endpoint, specs, prompts, progress=False))
  wall, share = clock.stop(cores)
  server_cpu = proc_cpu_s(pid) - start_cpu
  bad = [r for r in records if not r.ok or r.output_tokens_reported != max_tokens]
  if bad:
    raise RuntimeError(f'server: {len(bad)} requests failed or came back short, e.g. {bad[0]}.')
  return {'seconds': wall, 'server_cpu_s': server_cpu, 'client_cpu_share': share,
          'server_cpu_share': server_cpu / (wall * cores)}


def start_server(args, cfg, params, ecfg: EngineConfig, max_waiting: int, tmp: str):
  """`stoker serve` of `params` (written under tmp) with every field of ecfg; (process, url,
  command). Its log goes to <out_dir>/serve_engine_server.log."""
  model_dir = os.path.join(tmp, 'model')
  hf_files.write(model_dir, cfg, nnx.to_pure_dict(params))
  write_tokenizer(os.path.join(model_dir, 'tokenizer.json'), cfg.vocab_size)
  gin = [f'engine.{k}={gin_value(v)}' for k, v in dataclasses.asdict(ecfg).items()
         if k != 'compilation_cache_dir'] + [f'server.max_waiting={max_waiting}']
  port = free_port()
  cmd = stoker('serve', '--hf-dir', model_dir, '--port', str(port), '--served-model-name', 'bench',
               *[x for g in gin for x in ('--gin_param', g)])
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'serve_engine_server.log'), 'w') as server_log:
    proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, cwd=REPO)
  command = shlex.join(['stoker'] + cmd[2:]).replace(model_dir, '<random weights>')
  return proc, f'http://127.0.0.1:{port}', command


def section_server(args, cores: int, engine_config) -> dict:
  cfg = presets.preset(args.limits_preset, dtype='float32' if jax.default_backend() == 'cpu'
                       else 'auto')
  params = random_params(cfg, args.seed)
  rng = np.random.default_rng(args.seed + 5)
  (lo, hi), m = args.server_prompt_len, args.server_max_tokens
  prompts = [rng.integers(1, cfg.vocab_size, int(k)).tolist()
             for k in rng.integers(lo, hi + 1, args.server_requests)]
  M = -(-(hi + m) // args.page_size)
  ecfg = engine_config(args, num_pages=args.batch * M + 1, max_pages_per_seq=M)
  tokens, sp = len(prompts) * m, SamplingParams(max_tokens=m)
  with tempfile.TemporaryDirectory() as tmp:
    proc, url, command = start_server(args, cfg, params, ecfg, len(prompts), tmp)  # no 429s
    try:
      engine = Engine(cfg, params, ecfg)  # compiles while the server loads
      try:
        wait_healthy(url, proc)
      except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f'{e}; see {args.out_dir}/serve_engine_server.log') from e
      endpoint = client.Endpoint(url, model='bench', temperature=0.0, ignore_eos=True)

      def generate() -> dict:
        clock = Clock()
        out = engine.generate(prompts, sp)
        wall, share = clock.stop(cores)
        assert sum(map(len, out)) == tokens
        return {'seconds': wall, 'cpu_share': share, 'cpu_s': share * wall * cores}

      peers = {'server': lambda: served(endpoint, prompts, m, proc.pid, cores),
               'generate': generate}
      runs = {name: [] for name in peers}
      for fn in peers.values():  # warm-up
        fn()
      for r in range(args.runs):
        for name in (list(peers) if r % 2 == 0 else list(peers)[::-1]):
          runs[name].append(peers[name]())
        log(f'[server] run {r + 1}/{args.runs}: ' + ', '.join(
            f'{k} {v[-1]["seconds"]:.2f} s' for k, v in runs.items()))
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()
  med = lambda name, key: statistics.median(r[key] for r in runs[name])
  return {'preset': args.limits_preset, 'requests': len(prompts), 'prompt_len': [lo, hi],
          'max_tokens': m, 'engine_config': dataclasses.asdict(ecfg), 'serve_command': command,
          'runs': runs,
          'server_tokens_per_sec': tokens / med('server', 'seconds'),
          'generate_tokens_per_sec': tokens / med('generate', 'seconds'),
          'paired_ratio_server_over_generate': statistics.median(
              g['seconds'] / s['seconds'] for s, g in zip(runs['server'], runs['generate'])),
          'server_cpu_ms_per_token': 1e3 * med('server', 'server_cpu_s') / tokens,
          'generate_cpu_ms_per_token': 1e3 * med('generate', 'cpu_s') / tokens,
          'server_cpu_share': med('server', 'server_cpu_share'),
          'client_cpu_share': med('server', 'client_cpu_share'),
          'generate_cpu_share': med('generate', 'cpu_share')}


def server_lines(s: dict) -> list[str]:
  """The server block of the table."""
  return [f"stoker serve at saturation vs Engine.generate: {s['preset']}, {s['requests']} requests "
          f"sent at once, prompts of {s['prompt_len'][0]}-{s['prompt_len'][1]} token ids, "
          f"{s['max_tokens']} output tokens each (ignore_eos); medians of "
          f"{len(s['runs']['server'])} runs",
          f"  server {s['server_tokens_per_sec']:,.0f} tokens/s (server process cpu "
          f"{s['server_cpu_share']:.0%}, client {s['client_cpu_share']:.0%}), generate "
          f"{s['generate_tokens_per_sec']:,.0f} tokens/s (cpu {s['generate_cpu_share']:.0%})",
          f"  server / generate (paired): {s['paired_ratio_server_over_generate']:.2f}x "
          "(acceptance >= 0.90x)",
          "  CPU time per generated token: the whole server process "
          f"{s['server_cpu_ms_per_token']:.2f} ms, Engine.generate's process "
          f"{s['generate_cpu_ms_per_token']:.2f} ms", '']
