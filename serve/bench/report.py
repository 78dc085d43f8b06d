"""A run's files: DIR/requests.csv (one row per request, token times included, so every metric can be
recomputed), DIR/summary.json, and the PNG plots (plots.py). DIR may be local, gs://BUCKET/PATH or
s3://BUCKET/PATH: every file goes through storage/ (each written whole)."""

from __future__ import annotations

import csv
import json
import math
from typing import Sequence

import storage

CSV_NAME, SUMMARY_NAME = 'requests.csv', 'summary.json'


def _finite(value):
  """JSON has no NaN or inf: write them as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def write_csv(rows: Sequence[dict], path: str) -> None:
  if not rows:
    raise ValueError(f'no requests to write to {path}.')
  with storage.open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in row.items()} for row in rows)


def read_csv(path: str) -> list[dict]:
  with storage.open(path, newline='') as f:
    return list(csv.DictReader(f))


def write_json(data: dict, path: str) -> None:
  with storage.open(path, 'w') as f:
    json.dump(_finite(data), f, indent=2, sort_keys=False)
    f.write('\n')


def write_run(out_dir: str, rows: Sequence[dict], summary: dict, records, plots: bool = True) -> list[str]:
  """Writes the run's CSV, JSON and (plots=True) PNGs into out_dir; returns the paths written."""
  storage.makedirs(out_dir)
  paths = [storage.join(out_dir, CSV_NAME), storage.join(out_dir, SUMMARY_NAME)]
  write_csv(rows, paths[0])
  write_json(summary, paths[1])
  if plots:
    from serve.bench import plots as plots_lib  # pylint: disable=g-import-not-at-top  (matplotlib is slow)
    paths += plots_lib.plot_run(out_dir, rows, summary, records)
  return paths


def format_summary(summary: dict) -> str:
  """A few lines for the terminal."""
  def ms(d, key='p50'):
    return '-' if d.get(key) is None else f'{d[key] * 1e3:.1f}'
  lines = [f'{summary["completed"]}/{summary["requests"]} requests in {summary["duration_s"]:.1f} s'
           + (f'; errors {summary["errors"]}' if summary['errors'] else '')]
  for name in ('ttft_s', 'tbt_s', 'tpot_s', 'e2e_s', 'normalized_latency_s'):
    d = summary[name]
    lines.append(f'  {name[:-2]:<20} ms  mean {ms(d, "mean"):>9}  p50 {ms(d):>9}  p90 {ms(d, "p90"):>9}  '
                 f'p99 {ms(d, "p99"):>9}')
  fl = summary['fluidity_index']
  if fl['count']:
    lines.append(f'  fluidity-index          mean {fl["mean"]:.3f}  p50 {fl["p50"]:.3f}  min {fl["min"]:.3f}')
  rate = summary['fluid_token_generation_rate']
  lines.append(f'  throughput {summary["output_token_throughput"] or 0:.1f} tok/s, '
               f'{summary["request_throughput"] or 0:.2f} req/s; fluid token generation rate '
               f'{"-" if rate is None else f"{rate:.1f}"} tok/s; goodput {summary["goodput"] or 0:.2f} req/s')
  slo = summary['slo']
  checks = ', '.join(f'{k} q{c["quantile"]} = {c["value"] if c["value"] is None else round(c["value"], 4)} '
                     f'(<= {c["target"]})' for k, c in slo['checks'].items())
  lines.append(f'  SLO {"PASSED" if slo["passed"] else "FAILED"}: {checks}')
  if summary['token_count_mismatches']:
    lines.append(f'  warning: {summary["token_count_mismatches"]} requests streamed a token count other than '
                 'the usage the server reported (chunks carrying several tokens without logprobs?)')
  return '\n'.join(lines)
