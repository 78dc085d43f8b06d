"""What `stoker plan` writes: the ranked table (markdown), plan.json and the Pareto plot (matplotlib, Agg),
into a local directory, gs://BUCKET/PATH or s3://BUCKET/PATH (storage/); `plan_command` runs the whole command."""

from __future__ import annotations

import argparse
import json
import time

import storage
from models.config import ModelConfig
from serve.bench.workload import WorkloadConfig
from serve.sim import plan, plan_space, slo

TABLE_ROWS = 20


def _fmt(x, spec='.3g'):
  return '-' if x is None else format(x, spec)


def _config(r: dict) -> str:
  return f'{r["device"]} x{r["tp"]}, max_seqs {r["max_seqs"]}, token_budget {r["token_budget"]}'


def table(result: dict, rows: int = TABLE_ROWS) -> str:
  """The searched configurations ranked by requests served per dollar at capacity, as a markdown table."""
  metrics = list(result['ranked'][0]['values_at_lowest']) if result['ranked'] else []
  target = result['target_qps']
  head = ['#', 'device', 'chips (tp)', 'max_seqs', 'token_budget', 'KV pages', '$/h', 'capacity req/s',
          'requests/$'] + [f'{m} @cap (s)' for m in metrics]
  if target:
    head += [f'replicas for {target:g} req/s', '$/h for it']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for i, r in enumerate(result['ranked'][:rows], 1):
    values = r['values_at_capacity'] or {}
    cells = [str(i), r['device'], str(r['tp']), str(r['max_seqs']), str(r['token_budget']), str(r['num_pages']),
             f'{r["price_usd_per_hour"]:.2f}',
             _fmt(r['capacity_rps']) + (' (ceiling)' if r['at_ceiling'] else ''),
             f'{r["requests_per_usd"]:,.0f}'] + [_fmt(values.get(m)) for m in metrics]
    if target:
      cells += [_fmt(r['replicas'], 'd'), _fmt(r['cost_usd_per_hour'], '.2f')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  more = len(result['ranked']) - rows
  notes = [f'{more} more searched (plan.json)'] if more > 0 else []
  if any(r['at_ceiling'] for r in result['ranked']):
    notes.append('(ceiling): the SLO still held at the throughput the replica sustains (the lower of the step-time '
                 'bound and a saturated simulation): throughput, not latency, limits it')
  if result['pruned']:
    notes.append(f'{len(result["pruned"])} not searched: their throughput bound per dollar could not beat the best')
  if result['skipped']:
    notes.append(f'{len(result["skipped"])} left out: the model and KV pages for the longest request do not fit '
                 "(plan.json 'skipped')")
  return '\n'.join(lines + ([''] + [f'- {n}' for n in notes] if notes else []))


def verdict(result: dict) -> str:
  """The chosen configuration in a sentence: the best per dollar, or the cheapest for the target rate."""
  c, q = result['chosen'], result['target_qps']
  if not q:
    return (f'Best capacity per dollar: {_config(c)}: {c["capacity_rps"]:.3g} req/s per replica at '
            f'${c["price_usd_per_hour"]:.2f}/h ({c["requests_per_usd"]:,.0f} requests/$).')
  n, checked = c['replicas'], c['replicas_checked']
  head = (f'Cheapest for {q:g} req/s under {result["slo"]}: {n} x ({_config(c)}) = '
          f'${c["cost_usd_per_hour"]:.2f}/h; ')
  if checked is None:
    return head + (f'but a simulation of up to {c["check"][-1]["replicas"]} replicas at that rate still misses the '
                   'SLO: treat this configuration with care.')
  more = '.' if checked == n else f' (it needed {checked - n} more: ${checked * c["price_usd_per_hour"]:.2f}/h).'
  return (head + f'a simulation of {checked} replica{"s" * (checked != 1)} behind the router at {q:g} req/s '
          f'meets the SLO{more}')


def _jsonable(result: dict) -> dict:
  def clean(r):
    return {k: v for k, v in r.items() if k != 'candidate'}
  return {**result, 'ranked': [clean(r) for r in result['ranked']], 'chosen': clean(result['chosen'])}


def pareto(points: list[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point beats on both axes (lower x = cost, higher y = capacity)."""
  return [i for i, (x, y) in enumerate(points)
          if not any((x2 <= x and y2 >= y) and (x2, y2) != (x, y) for x2, y2 in points)]


def plot(path: str, result: dict) -> str:
  """Left: capacity against price per replica, the Pareto front drawn; right: requests/$ against the first
  SLO metric at capacity. The chosen configuration is circled."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only when plotting)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = [r for r in result['ranked'] if r['capacity_rps']]
  metric = next(iter(rows[0]['values_at_capacity'])) if rows else None
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
  devices = sorted({r['device'] for r in rows})
  for d in devices:
    mine = [r for r in rows if r['device'] == d]
    left.scatter([r['price_usd_per_hour'] for r in mine], [r['capacity_rps'] for r in mine], label=d, alpha=0.8)
    right.scatter([r['values_at_capacity'][metric] for r in mine], [r['requests_per_usd'] for r in mine],
                  label=d, alpha=0.8)
  points = [(r['price_usd_per_hour'], r['capacity_rps']) for r in rows]
  front = sorted((points[i] for i in pareto(points)))
  if front:
    left.step([p[0] for p in front], [p[1] for p in front], where='post', color='tab:gray', linewidth=1,
              label='Pareto front')
  c = result['chosen']
  left.scatter([c['price_usd_per_hour']], [c['capacity_rps']], s=200, facecolors='none', edgecolors='black',
               label='chosen')
  right.scatter([c['values_at_capacity'][metric]], [c['requests_per_usd']], s=200, facecolors='none',
                edgecolors='black', label='chosen')
  left.set_xlabel('price per replica ($/h)')
  left.set_ylabel('capacity per replica (req/s meeting the SLO)')
  left.set_title(f'capacity vs cost ({result["slo"]})')
  right.set_xlabel(f'{metric} at capacity (s, the SLO quantile)')
  right.set_ylabel('requests per dollar at capacity')
  right.set_title('capacity per dollar vs latency')
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  from serve.bench import plots  # pylint: disable=g-import-not-at-top
  plots.save(fig, path)
  return path


def write(out_dir: str, result: dict, plots: bool = True) -> list[str]:
  """plan.json, plan.md (table + verdict) and pareto.png under out_dir; returns their paths."""
  storage.makedirs(out_dir)
  paths = [storage.join(out_dir, 'plan.json'), storage.join(out_dir, 'plan.md')]
  with storage.open(paths[0], 'w') as f:
    json.dump(_jsonable(result), f, indent=1, default=str)
  with storage.open(paths[1], 'w') as f:
    f.write(f'# stoker plan: {result["slo"]}\n\n{table(result, len(result["ranked"]))}\n\n{verdict(result)}\n')
  if plots:
    paths.append(plot(storage.join(out_dir, 'pareto.png'), result))
  return paths


def _ints(text: str, flag: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(',') if x.strip())
  except ValueError:
    raise ValueError(f'{flag} {text!r}: give comma-separated integers.') from None


def add_arguments(p: argparse.ArgumentParser) -> None:
  """`stoker plan`'s flags."""
  p.add_argument('--model', required=True, help='A model gin file (configs/model/*.gin) or a preset name.')
  p.add_argument('--workload', default='requests=64,prompt=uniform:128:1024,output=uniform:32:256',
                 help='key=value,... as `stoker bench --workload` (the rate is what the search varies).')
  p.add_argument('--slo', required=True, help="e.g. 'ttft_p90<2s,tbt_p99<200ms' (ttft, tbt, tpot, e2e).")
  p.add_argument('--target-qps', type=float, default=None, help='Requests/s to serve: replicas and cost.')
  p.add_argument('--devices', default='all',
                 help="Roofline devices to consider, comma-separated (serve/sim/devices.py); 'all' (default) "
                      "or 'none' (with --profile).")
  p.add_argument('--profile', default=None,
                 help='Also consider the backend a `stoker profile --out DIR` directory measured (a local '
                      'path, gs:// or s3://).')
  p.add_argument('--profile-price', type=float, default=1.0, help='$/h of the profiled backend (1.0).')
  p.add_argument('--max-seqs', default='32,128', help='Batch caps to try (comma-separated).')
  p.add_argument('--token-budgets', default='512,2048', help='Prefill chunks (token budgets) to try.')
  p.add_argument('--tolerance', type=float, default=0.1, help='Capacity resolution, relative (0.1).')
  p.add_argument('--router', default='least_outstanding', choices=['round_robin', 'least_outstanding'])
  p.add_argument('--out', default='plan', help='Output directory (a local path, gs:// or s3://): plan.json, '
                 'plan.md, pareto.png.')
  p.add_argument('--exhaustive', action='store_true',
                 help='Search every configuration (default: skip those whose throughput bound per dollar '
                      'cannot beat the best found; the answer is the same, the table shorter).')
  p.add_argument('--no-plots', action='store_true')


def plan_command(model: ModelConfig, objective: slo.LatencySLO, args: argparse.Namespace) -> int:
  """`stoker plan` with add_arguments' flags, for `model` under `objective` (the parsed --slo):
  searches, writes --out, prints the table and the verdict."""
  start = time.perf_counter()
  storage.check(args.out, write=True)  # an unusable bucket fails before the search, not after it
  cfg = plan.PlanConfig(WorkloadConfig.parse(args.workload), objective, args.target_qps,
                        _ints(args.max_seqs, '--max-seqs'), _ints(args.token_budgets, '--token-budgets'),
                        tolerance=args.tolerance, router=args.router, prune=not args.exhaustive)
  names = [d.strip() for d in args.devices.split(',') if d.strip() not in ('', 'none')]
  hardware = plan_space.roofline_hardware(model, names)
  if args.profile:
    hardware.append(plan_space.profiled_hardware(model, args.profile, args.profile_price))
  if not hardware:
    raise ValueError('stoker plan: nothing to plan on; name --devices and/or a --profile DIR.')
  result = plan.plan(hardware, cfg)
  paths = write(args.out, result, plots=not args.no_plots)
  print(table(result))
  print(verdict(result))
  print(f'{result["simulations"]} simulations in {time.perf_counter() - start:.1f} s; wrote {", ".join(paths)}')
  return 0
