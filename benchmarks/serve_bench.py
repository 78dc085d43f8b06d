"""`stoker bench` against `stoker serve`: chunked prefill (Sarathi-Serve) vs prefill-first (vLLM v0).

  python benchmarks/serve_bench.py --checkpoint runs/tiny        # a `stoker train` workdir
  python benchmarks/serve_bench.py --checkpoint runs/tiny --skip_capacity --requests 60

For each policy the script starts `stoker serve --checkpoint ... --gin_param engine.policy=...` on a free
loopback port (same engine limits otherwise), waits for /health, then runs `stoker bench` twice with the
same seeded workload and deadlines: once at --rate (the fixed-load comparison: fluidity-index, TBT, TTFT)
and once with --capacity-search (the highest Poisson rate whose P99 miss rate stays <= 0.1). The
commands are printed and recorded. Writes benchmarks/out/serve_bench/<policy>/{run,capacity}/ (the
bench's own files), benchmarks/out/serve_bench.json and benchmarks/out/serve_bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = ('chunked', 'prefill_first')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--checkpoint', required=True, help='a `stoker train` workdir to serve')
  p.add_argument('--tokenizer', default=os.path.expanduser('~/.cache/stoker/data/stdlib-v4096'),
                 help="the served model's tokenizer (default: the stdlib corpus's)")
  p.add_argument('--policies', default=','.join(POLICIES))
  p.add_argument('--token_budget', type=int, default=128)
  p.add_argument('--max_seqs', type=int, default=16)
  p.add_argument('--num_pages', type=int, default=1024)
  p.add_argument('--max_pages_per_seq', type=int, default=64)
  p.add_argument('--requests', type=int, default=80)
  p.add_argument('--rate', type=float, default=1.0, help='requests/s of the fixed-load run')
  p.add_argument('--prompt', default='uniform:64:768')
  p.add_argument('--output', default='uniform:32:96')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--prefill_deadline', type=float, default=2.0, help='D_p (s)')
  p.add_argument('--decode_deadline', type=float, default=0.25, help='D_d (s)')
  p.add_argument('--skip_capacity', action='store_true')
  p.add_argument('--capacity_requests', type=int, default=48)
  p.add_argument('--start_rate', type=float, default=0.5)
  p.add_argument('--min_rate', type=float, default=0.1)
  p.add_argument('--max_probes', type=int, default=6)
  p.add_argument('--rate_tolerance', type=float, default=0.15)
  p.add_argument('--out_dir', default=os.path.join(REPO, 'benchmarks', 'out'))
  return p.parse_args(argv)


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 900) -> None:
  end = time.monotonic() + timeout_s
  while time.monotonic() < end:
    if server.poll() is not None:
      raise RuntimeError(f'stoker serve exited with {server.returncode} before becoming healthy')
    try:
      with urllib.request.urlopen(f'{url}/health', timeout=5) as r:
        if r.status == 200:
          return
    except OSError:
      pass
    time.sleep(2)
  raise TimeoutError(f'{url}/health not ready after {timeout_s} s')


def stoker(*args: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, 'cli.py'), *args]


def run_policy(args, policy: str) -> dict:
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  serve_cmd = stoker('serve', '--checkpoint', args.checkpoint, '--tokenizer', args.tokenizer,
                     '--port', str(port),
                     '--gin_param', f"engine.policy='{policy}'",
                     '--gin_param', f'engine.token_budget={args.token_budget}',
                     '--gin_param', f'engine.max_seqs={args.max_seqs}',
                     '--gin_param', f'engine.num_pages={args.num_pages}',
                     '--gin_param', f'engine.max_pages_per_seq={args.max_pages_per_seq}')
  log('$ ' + shlex.join(serve_cmd))
  out = os.path.join(args.out_dir, 'serve_bench', policy)
  with open(os.path.join(args.out_dir, f'serve_bench_{policy}_server.log'), 'w') as server_log:
    server = subprocess.Popen(serve_cmd, stdout=server_log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
      wait_healthy(url, server)
      workload = (f'requests={args.requests},arrival=poisson,rate={args.rate},prompt={args.prompt},'
                  f'output={args.output},seed={args.seed}')
      common = ['--url', url, '--tokenizer', args.tokenizer, '--no-progress', '--warmup', '2',
                '--prefill-deadline', str(args.prefill_deadline),
                '--decode-deadline', str(args.decode_deadline)]
      commands = {'run': stoker('bench', *common, '--workload', workload, '--out', os.path.join(out, 'run'))}
      if not args.skip_capacity:
        cap_workload = workload.replace(f'requests={args.requests}', f'requests={args.capacity_requests}')
        commands['capacity'] = stoker('bench', *common, '--workload', cap_workload,
                                      '--out', os.path.join(out, 'capacity'), '--capacity-search',
                                      '--start-rate', str(args.start_rate), '--min-rate', str(args.min_rate),
                                      '--max-probes',
                                      str(args.max_probes), '--rate-tolerance', str(args.rate_tolerance))
      result = {'serve_command': shlex.join(serve_cmd)}
      for name, cmd in commands.items():
        log('$ ' + shlex.join(cmd))
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        log(done.stdout + done.stderr[-2000:])
        if done.returncode not in (0, 1):
          raise RuntimeError(f'stoker bench failed ({done.returncode}): {done.stderr[-2000:]}')
        result[f'{name}_command'] = shlex.join(cmd)
        result[f'{name}_wall_s'] = time.perf_counter() - t0
      with open(os.path.join(out, 'run', 'summary.json')) as f:
        result['run'] = json.load(f)
      if 'capacity' in commands:
        with open(os.path.join(out, 'capacity', 'capacity.json')) as f:
          result['capacity'] = json.load(f)
      return result
    finally:
      server.send_signal(signal.SIGTERM)
      try:
        server.wait(120)
      except subprocess.TimeoutExpired:
        server.kill()


def headline(result: dict) -> dict:
  s = result['run']
  out = {'fluidity_mean': s['fluidity_index']['mean'], 'fluidity_p50': s['fluidity_index']['p50'],
         'fluidity_min': s['fluidity_index']['min'], 'miss_rate_p99': s['miss_rate']['p99'],
         'ttft_p50_s': s['ttft_s']['p50'], 'ttft_p99_s': s['ttft_s']['p99'],
         'tbt_p50_s': s['tbt_s']['p50'], 'tbt_p99_s': s['tbt_s']['p99'], 'tbt_max_s': s['tbt_s']['max'],
         'fluid_token_rate': s['fluid_token_generation_rate'], 'tokens_per_s': s['output_token_throughput'],
         'goodput': s['goodput'], 'completed': s['completed'], 'errors': s['errors']}
  if 'capacity' in result:
    out['capacity_rate'] = result['capacity']['capacity_rate']
  return out


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from serve.bench import metrics, report  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
  for policy, result in results.items():
    rows = report.read_csv(os.path.join(result['out'], 'run', 'requests.csv'))
    ok = [r for r in rows if not r['error']]
    fluid = np.sort([float(r['fluidity_index']) for r in ok])
    axes[0].step(fluid, np.arange(1, fluid.size + 1) / fluid.size, where='post', label=policy)
    tbt = np.sort([g / 1e3 for r in ok for g in metrics.gaps_us([int(t) for t in r['token_times_us'].split()])[1:]])
    axes[1].step(tbt, np.arange(1, tbt.size + 1) / tbt.size, where='post', label=policy)
    if 'capacity' in result:
      curve = sorted(result['capacity']['curve'], key=lambda p: p['rate'])
      axes[2].plot([p['rate'] for p in curve], [p['slo_value'] for p in curve], marker='o',
                   label=f'{policy} (capacity {result["capacity"]["capacity_rate"]} req/s)')
  axes[0].set(xlabel='fluidity-index', ylabel='fraction of requests', title='CDF of fluidity-index')
  axes[1].set(xlabel='time between tokens (ms)', ylabel='fraction of gaps', title='CDF of TBT', xscale='log')
  axes[2].axhline(0.1, color='tab:red', linestyle='--', linewidth=1, label='target 0.1')
  axes[2].set(xlabel='Poisson arrival rate (req/s)', ylabel='P99 over requests of the miss rate',
              title='capacity search')
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  results = {}
  for policy in args.policies.split(','):
    results[policy] = run_policy(args, policy)
    results[policy]['out'] = os.path.join(args.out_dir, 'serve_bench', policy)
    results[policy]['headline'] = headline(results[policy])
  table = {p: r['headline'] for p, r in results.items()}
  log(json.dumps(table, indent=2))
  with open(os.path.join(args.out_dir, 'serve_bench.json'), 'w') as f:
    json.dump({'args': vars(args), 'results': {p: {k: v for k, v in r.items() if k != 'run'}
                                                 for p, r in results.items()},
               'headline': table}, f, indent=2)
  plot(results, os.path.join(args.out_dir, 'serve_bench.png'))
  log(f'wrote {os.path.join(args.out_dir, "serve_bench.json")} and serve_bench.png')
  return 0


if __name__ == '__main__':
  sys.exit(main())
