"""The flags of `stoker bench` and the BenchConfig they make (cli.py adds the subcommand and calls main).

Imports nothing heavy at module level: `stoker --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument('--url', required=True, help='The server, e.g. http://127.0.0.1:8000 (with or without /v1).')
  p.add_argument('--api-key', default=None, help='Sent as Authorization: Bearer KEY.')
  p.add_argument('--model', default=None, help='Model name (default: the first the server lists).')
  p.add_argument('--api', default='completions', choices=['completions', 'chat'])
  p.add_argument('--tokenizer', default=None,
                 help="The server's tokenizer.json or its directory: prompts get exact token counts. Default: "
                      "the one a Stoker server serves (GET /tokenizer.json); other servers need it.")
  p.add_argument('--workload', default='',
                 help='key=value,... of requests, arrival (poisson|gamma|fixed|trace), rate, burstiness, '
                      'prompt / output (fixed:N | uniform:LO:HI | zipf:THETA:LO:HI | trace), trace (CSV '
                      'with num_prefill_tokens,num_decode_tokens[,arrived_at]), seed. Default: requests=100,'
                      'arrival=poisson,rate=1,prompt=uniform:32:256,output=uniform:16:128,seed=0.')
  p.add_argument('--out', required=True, help='Output directory (a local path, gs:// or s3://): requests.csv, '
                 'summary.json, PNG plots.')
  p.add_argument('--max-concurrency', type=int, default=None, help='Requests in flight at most (default: no cap).')
  p.add_argument('--timeout', type=float, default=600.0, help='Seconds per request (default 600).')
  p.add_argument('--temperature', type=float, default=0.0)
  p.add_argument('--ignore-eos', action='store_true', help="Send vLLM's ignore_eos extension.")
  p.add_argument('--extra-body', default=None, help='A JSON object of more request fields.')
  p.add_argument('--warmup', type=int, default=0, help='Unrecorded requests sent first, one at a time.')
  p.add_argument('--wait-ready', type=float, default=600.0,
                 help='Seconds to wait for a server that answers 503 while it loads (default 600).')
  p.add_argument('--no-progress', action='store_true', help='No progress bar.')
  p.add_argument('--no-plots', action='store_true', help='No PNGs (no matplotlib import).')
  g = p.add_argument_group('deadlines and SLO')
  g.add_argument('--decode-deadline', type=float, default=0.1, help='D_d: seconds per later token (0.1).')
  g.add_argument('--prefill-deadline', type=float, default=1.0, help='D_p: seconds to the first token (1.0).')
  g.add_argument('--prefill-profile', default=None,
                 help='A prefill_profile.json: D_p = predicted prefill time of the prompt + --ttft-slack.')
  g.add_argument('--profile-prefill', default=None,
                 help='Comma-separated prompt lengths: first measure min TTFT at each (one request at a '
                      'time), write prefill_profile.json and predict D_p from it.')
  g.add_argument('--profile-repeats', type=int, default=3)
  g.add_argument('--ttft-slack', type=float, default=0.0, help='Added to the predicted prefill time (s).')
  g.add_argument('--slo', default='deadline', choices=['deadline', 'latency'],
                 help='deadline: P(--slo-quantile) over requests of the miss rate <= --max-miss-rate; '
                      'latency: --ttft-target / --tbt-target at their quantiles.')
  g.add_argument('--max-miss-rate', type=float, default=0.1)
  g.add_argument('--slo-quantile', type=float, default=0.99)
  g.add_argument('--ttft-target', type=float, default=None)
  g.add_argument('--ttft-quantile', type=float, default=0.9)
  g.add_argument('--tbt-target', type=float, default=None)
  g.add_argument('--tbt-quantile', type=float, default=0.99)
  c = p.add_argument_group('capacity search')
  c.add_argument('--capacity-search', action='store_true',
                 help='Binary search on the arrival rate for the highest load meeting the SLO.')
  c.add_argument('--start-rate', type=float, default=1.0)
  c.add_argument('--min-rate', type=float, default=0.05)
  c.add_argument('--max-rate', type=float, default=256.0)
  c.add_argument('--rate-tolerance', type=float, default=0.1, help='Relative width to stop at (0.1).')
  c.add_argument('--max-probes', type=int, default=10)


def config_from_args(args: argparse.Namespace):
  from serve.bench import analysis, capacity, client, run, workload  # pylint: disable=g-import-not-at-top
  extra = {}
  if args.extra_body:
    try:
      extra = json.loads(args.extra_body)
    except json.JSONDecodeError as e:
      raise ValueError(f'--extra-body {args.extra_body!r} is not JSON ({e}).') from None
    if not isinstance(extra, dict):
      raise ValueError(f'--extra-body {args.extra_body!r}: give a JSON object.')
  if args.timeout <= 0 or not math.isfinite(args.timeout):
    raise ValueError(f'--timeout {args.timeout}: give seconds > 0.')
  if args.max_concurrency is not None and args.max_concurrency < 1:
    raise ValueError(f'--max-concurrency {args.max_concurrency}: give at least 1.')
  lengths = ()
  if args.profile_prefill:
    try:
      lengths = tuple(int(x) for x in args.profile_prefill.split(','))
    except ValueError:
      raise ValueError(f'--profile-prefill {args.profile_prefill!r}: give prompt lengths like 16,64,256.') from None
  endpoint = client.Endpoint(args.url, args.model, args.api_key, args.api, args.timeout, args.temperature,
                             args.ignore_eos, tuple(extra.items()))
  slo = analysis.SLO(
      decode_deadline_s=args.decode_deadline, prefill_deadline_s=args.prefill_deadline,
      prefill_profile=run.load_profile(args.prefill_profile) if args.prefill_profile else None,
      ttft_slack_s=args.ttft_slack, kind=args.slo, max_miss_rate=args.max_miss_rate,
      quantile=args.slo_quantile, ttft_target_s=args.ttft_target, ttft_quantile=args.ttft_quantile,
      tbt_target_s=args.tbt_target, tbt_quantile=args.tbt_quantile)
  search = capacity.SearchConfig(args.start_rate, args.min_rate, args.max_rate, args.rate_tolerance,
                                 args.max_probes) if args.capacity_search else None
  return run.BenchConfig(endpoint, workload.WorkloadConfig.parse(args.workload), slo, args.out,
                         args.tokenizer, max_concurrency=args.max_concurrency, warmup=args.warmup,
                         wait_ready_s=args.wait_ready, progress=not args.no_progress,
                         plots=not args.no_plots, capacity=search, profile_lengths=lengths,
                         profile_repeats=args.profile_repeats)


def main(args: argparse.Namespace) -> int:
  """`stoker bench`: 1 when every request failed (or no probed rate met the SLO), else 0."""
  from serve.bench import run  # pylint: disable=g-import-not-at-top
  result = run.bench(config_from_args(args))
  if 'capacity_rate' in result:
    return 0 if result['capacity_rate'] is not None else 1
  return 0 if result['completed'] else 1
