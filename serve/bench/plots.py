"""The run's PNG plots (matplotlib, Agg): CDFs of TTFT / TBT / normalized latency / fluidity-index, tokens
generated vs time, deadline-miss rate vs the TBT deadline, and the capacity-search curve. Each is written
through storage/ (`save`), so the directory may be gs://BUCKET/PATH or s3://BUCKET/PATH."""

from __future__ import annotations

from typing import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

import storage  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from serve.bench import metrics as m  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

MAX_STREAMS = 40  # per-request lines drawn in tokens_vs_time.png


def save(fig, path: str, dpi: int = 100) -> str:
  """Writes `fig` as a PNG to `path` (local or a bucket: savefig gets a storage file, one whole object)
  and closes it."""
  try:
    with storage.open(path, 'wb') as f:
      fig.savefig(f, format='png', dpi=dpi)
  finally:
    plt.close(fig)
  return path


def _cdf(ax, values, label, xlabel, target=None):
  xs = np.sort(np.asarray([v for v in values if v is not None], np.float64))
  if xs.size:
    ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where='post', label=label)
  if target is not None:
    ax.axvline(target, color='tab:red', linestyle='--', linewidth=1, label=f'deadline {target:g}')
  ax.set_xlabel(xlabel)
  ax.set_ylabel('fraction')
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)


def plot_run(out_dir: str, rows: Sequence[dict], summary: dict, records) -> list[str]:
  ok = [r for r in records if r.ok]
  ok_rows = [row for row in rows if row['error'] is None]
  slo = summary['slo']['definition']
  paths = []

  fig, axes = plt.subplots(1, 4, figsize=(18, 4))
  _cdf(axes[0], [row['ttft_s'] for row in ok_rows], 'TTFT', 'TTFT (s)')
  tbt = [g / m.US_PER_S for r in ok for g in m.gaps_us(r.token_offsets_us)[1:]]
  _cdf(axes[1], tbt, 'TBT', 'time between tokens (s)', slo['decode_deadline_s'])
  _cdf(axes[2], [row['normalized_latency_s'] for row in ok_rows], 'norm. latency',
       'normalized latency (s/token)')
  _cdf(axes[3], [row['fluidity_index'] for row in ok_rows], 'fluidity', 'fluidity-index')
  for ax, title in zip(axes, ('TTFT', 'TBT', 'normalized latency', 'fluidity-index')):
    ax.set_title(f'CDF of {title} ({len(ok_rows)} requests)')
  fig.tight_layout()
  paths.append(save(fig, storage.join(out_dir, 'cdfs.png')))

  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
  times = np.sort(np.asarray([(r.sent_us + t) / m.US_PER_S for r in ok for t in r.token_offsets_us]))
  if times.size:
    left.step(times, np.arange(1, times.size + 1), where='post')
  left.set_xlabel('time since the run started (s)')
  left.set_ylabel('output tokens received (all requests)')
  left.set_title(f'tokens generated vs time ({summary["output_token_throughput"] or 0:.1f} tok/s)')
  left.grid(alpha=0.3)
  for r in ok[:MAX_STREAMS]:
    t = np.asarray(r.token_offsets_us) / m.US_PER_S
    right.step(t, np.arange(1, t.size + 1), where='post', linewidth=0.8, alpha=0.7)
  right.set_xlabel('time since the request was sent (s)')
  right.set_ylabel('tokens of the request')
  right.set_title(f'per-request streams (first {min(len(ok), MAX_STREAMS)}): flat steps are stalls')
  right.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(save(fig, storage.join(out_dir, 'tokens_vs_time.png')))

  fig, ax = plt.subplots(figsize=(7, 4.5))
  curve = summary['miss_rate_vs_decode_deadline']
  if curve:
    ax.plot([p['decode_deadline_s'] * 1e3 for p in curve], [p['miss_rate'] for p in curve], marker='.')
    ax.set_xscale('log')
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
  ax.axhline(slo['max_miss_rate'], color='tab:red', linestyle='--', linewidth=1,
             label=f'target miss rate {slo["max_miss_rate"]:g}')
  ax.axvline(slo['decode_deadline_s'] * 1e3, color='tab:gray', linestyle=':', linewidth=1,
             label=f'D_d = {slo["decode_deadline_s"] * 1e3:g} ms')
  ax.set_xlabel('TBT deadline D_d (ms)')
  ax.set_ylabel(f'P{slo["quantile"] * 100:g} over requests of the miss rate')
  ax.set_title('deadline-miss rate vs TBT target (first token ignored)')
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  paths.append(save(fig, storage.join(out_dir, 'miss_rate_vs_tbt.png')))
  return paths


def plot_capacity(path: str, curve: Sequence[dict], capacity: float | None, max_miss_rate: float) -> str:
  """Each probe's P99 miss rate and goodput against its arrival rate; the capacity marked."""
  probes = sorted(curve, key=lambda p: p['rate'])
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  rates = [p['rate'] for p in probes]
  colors = ['tab:green' if p['passed'] else 'tab:red' for p in probes]
  left.plot(rates, [p['slo_value'] for p in probes], color='tab:gray', linewidth=1)
  left.scatter(rates, [p['slo_value'] for p in probes], c=colors, zorder=3)
  left.axhline(probes[0]['slo_target'] if probes else max_miss_rate, color='tab:red', linestyle='--',
               linewidth=1, label='target')
  left.set_xlabel('arrival rate (requests/s)')
  left.set_ylabel(f"{probes[0]['slo_metric']} (the SLO's quantile over requests)" if probes else 'SLO metric')
  left.set_title('SLO metric per probe (green: passed)')
  right.plot(rates, [p['goodput'] for p in probes], marker='o', label='goodput')
  right.plot(rates, [p['request_throughput'] for p in probes], marker='x', label='completed req/s')
  right.set_xlabel('arrival rate (requests/s)')
  right.set_ylabel('requests/s')
  right.set_title('goodput vs load')
  for ax in (left, right):
    if capacity is not None:
      ax.axvline(capacity, color='tab:green', linestyle=':', label=f'capacity {capacity:.3g} req/s')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  return save(fig, path)
