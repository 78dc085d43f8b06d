"""`stoker bench` against `stoker serve`: chunked prefill (Sarathi-Serve) vs prefill-first (vLLM v0).

  python benchmarks/serve_bench.py --checkpoint runs/tiny        # a `stoker train` workdir
  python benchmarks/serve_bench.py --checkpoint runs/tiny --skip_capacity --requests 60

Both servers are started at once (`stoker serve --checkpoint ... --gin_param engine.policy=...` on free
loopback ports, the same engine limits otherwise); an idle server costs next to nothing. The fixed-rate
runs of `stoker bench` (the same seeded workload and deadlines) then alternate between them in ABBA order,
--repeats per policy, so both see the same background load; medians over those runs are quoted. Then one
--capacity-search each (the highest Poisson rate whose P99 over requests of the miss rate stays <= 0.1).
The commands are printed and recorded. Writes benchmarks/out/serve_bench/<policy>/{run<i>,capacity}/ (the
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
  p.add_argument('--policies', default=','.join(POLICIES),
                 help='comma-separated policy[:token_budget] (default budget: --token_budget)')
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
  p.add_argument('--repeats', type=int, default=2, help='fixed-rate runs per policy, interleaved')
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


def start_server(args, spec: str):
  """spec: a policy, or policy:budget for another token budget than --token_budget."""
  policy, _, budget = spec.partition(':')
  port = free_port()
  cmd = stoker('serve', '--checkpoint', args.checkpoint, '--tokenizer', args.tokenizer, '--port', str(port),
               '--gin_param', f"engine.policy='{policy}'",
               '--gin_param', f'engine.token_budget={budget or args.token_budget}',
               '--gin_param', f'engine.max_seqs={args.max_seqs}',
               '--gin_param', f'engine.num_pages={args.num_pages}',
               '--gin_param', f'engine.max_pages_per_seq={args.max_pages_per_seq}')
  log('$ ' + shlex.join(cmd))
  server_log = open(os.path.join(args.out_dir, f'serve_bench_{label(spec)}_server.log'), 'w')
  proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, cwd=REPO)
  return f'http://127.0.0.1:{port}', proc, shlex.join(cmd)


def label(spec: str) -> str:
  policy, _, budget = spec.partition(':')
  return f'{policy}_budget{budget}' if budget else policy


def bench(cmd: list[str]) -> float:
  log('$ ' + shlex.join(cmd))
  t0 = time.perf_counter()
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  log(done.stdout + done.stderr[-2000:])
  if done.returncode not in (0, 1):
    raise RuntimeError(f'stoker bench failed ({done.returncode}): {done.stderr[-2000:]}')
  return time.perf_counter() - t0


def run_all(args, policies) -> dict:
  """Both servers up at once (an idle one costs nothing), the fixed-rate runs interleaved ABBA... so
  that both policies see the same background load, then one capacity search each."""
  servers = {p: start_server(args, p) for p in policies}
  results = {p: {'serve_command': servers[p][2], 'runs': []} for p in policies}
  try:
    for url, proc, _ in servers.values():
      wait_healthy(url, proc)
    workload = (f'requests={args.requests},arrival=poisson,rate={args.rate},prompt={args.prompt},'
                f'output={args.output},seed={args.seed}')
    order = [p for r in range(args.repeats) for p in (policies if r % 2 == 0 else policies[::-1])]
    log(f'fixed-rate runs in this order: {order}')
    for i, policy in enumerate(order):
      out = os.path.join(args.out_dir, 'serve_bench', label(policy), f'run{len(results[policy]["runs"])}')
      cmd = stoker('bench', *common_flags(args, servers[policy][0]), '--workload', workload, '--out', out)
      results[policy]['run_command'] = shlex.join(cmd)
      bench(cmd)
      with open(os.path.join(out, 'summary.json')) as f:
        results[policy]['runs'].append({'out': out, 'summary': json.load(f), 'order': i})
    if not args.skip_capacity:
      cap_workload = workload.replace(f'requests={args.requests}', f'requests={args.capacity_requests}')
      for policy in policies:
        out = os.path.join(args.out_dir, 'serve_bench', label(policy), 'capacity')
        cmd = stoker('bench', *common_flags(args, servers[policy][0]), '--workload', cap_workload,
                     '--out', out, '--capacity-search', '--start-rate', str(args.start_rate),
                     '--min-rate', str(args.min_rate), '--max-probes', str(args.max_probes),
                     '--rate-tolerance', str(args.rate_tolerance), '--no-plots')
        results[policy]['capacity_command'] = shlex.join(cmd)
        results[policy]['capacity_wall_s'] = bench(cmd)
        with open(os.path.join(out, 'capacity.json')) as f:
          results[policy]['capacity'] = json.load(f)
    return results
  finally:
    for _, proc, _ in servers.values():
      proc.send_signal(signal.SIGTERM)
    for _, proc, _ in servers.values():
      try:
        proc.wait(120)
      except subprocess.TimeoutExpired:
        proc.kill()


def common_flags(args, url: str) -> list[str]:
  return ['--url', url, '--tokenizer', args.tokenizer, '--no-progress', '--warmup', '2', '--ignore-eos',
          '--prefill-deadline', str(args.prefill_deadline), '--decode-deadline', str(args.decode_deadline)]


def headline(result: dict) -> dict:
  """Per metric: the median over the interleaved runs (each run's value in 'per_run')."""
  import statistics  # pylint: disable=g-import-not-at-top
  picks = {'fluidity_mean': ('fluidity_index', 'mean'), 'fluidity_p50': ('fluidity_index', 'p50'),
           'miss_rate_p99': ('miss_rate', 'p99'), 'ttft_p50_s': ('ttft_s', 'p50'),
           'ttft_p99_s': ('ttft_s', 'p99'), 'tbt_p50_s': ('tbt_s', 'p50'), 'tbt_p99_s': ('tbt_s', 'p99'),
           'tbt_max_s': ('tbt_s', 'max'), 'fluid_token_rate': ('fluid_token_generation_rate', None),
           'tokens_per_s': ('output_token_throughput', None), 'goodput': ('goodput', None)}
  per_run = {k: [r['summary'][a] if b is None else r['summary'][a][b] for r in result['runs']]
             for k, (a, b) in picks.items()}
  out = {k: statistics.median(v) for k, v in per_run.items() if None not in v}
  out['per_run'] = per_run
  out['errors'] = [r['summary']['errors'] for r in result['runs']]
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
    rows = [row for run in result['runs'] for row in report.read_csv(os.path.join(run['out'], 'requests.csv'))]
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
  results = run_all(args, args.policies.split(','))
  for result in results.values():
    result['headline'] = headline(result)
  table = {p: r['headline'] for p, r in results.items()}
  log(json.dumps(table, indent=2))
  with open(os.path.join(args.out_dir, 'serve_bench.json'), 'w') as f:
    json.dump({'args': vars(args), 'headline': table,
               'results': {p: {k: v for k, v in r.items() if k != 'runs'} | {
                   'runs': [{'out': x['out'], 'order': x['order']} for x in r['runs']]}
                           for p, r in results.items()}}, f, indent=2)
  plot(results, os.path.join(args.out_dir, 'serve_bench.png'))
  log(f'wrote {os.path.join(args.out_dir, "serve_bench.json")} and serve_bench.png')
  return 0


if __name__ == '__main__':
  sys.exit(main())
