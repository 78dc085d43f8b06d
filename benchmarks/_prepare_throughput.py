"""`benchmarks/data_throughput.py --prepare`: `stoker prepare` in process vs Apache Beam's DirectRunner
(see data_throughput.py's docstring); and `finish`, which both of its modes end with."""

from __future__ import annotations

import argparse
import datetime
from importlib import metadata
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa

from _common import Clock, cpu_name, log

_WORDS = ('the', 'stoker', 'feeds', 'coal', 'into', 'furnace', 'while', 'train', 'runs', 'north', 'café',
          'def', 'return', 'self', 'value', 'steam', 'engine', '東京', '(x)', '+=', '\n', '\t', 'import')


def write_text_corpus(root: str, documents: int, files: int, seed: int) -> int:
  """JSONL files of random-word documents (log-normal lengths, median 120 words), 5% of them a copy of a
  document of another file; returns the bytes written."""
  rng = np.random.default_rng(seed)
  words = np.array(_WORDS)
  lengths = np.clip(rng.lognormal(np.log(120), 0.8, documents), 3, 5000).astype(int)
  texts = [' '.join(words[rng.integers(0, len(words), n)]) for n in lengths]
  repeats = rng.choice(documents, documents // 20, replace=False)
  texts += [texts[i] for i in repeats]
  order = rng.permutation(len(texts))  # the copies land in other files than their originals (mostly)
  os.makedirs(root)
  total = 0
  for f, part in enumerate(np.array_split(order, files)):
    data = ''.join(json.dumps({'text': texts[i]}, ensure_ascii=False) + '\n' for i in part).encode()
    with open(os.path.join(root, f'part-{f:04d}.jsonl'), 'wb') as fh:
      fh.write(data)
    total += len(data)
  return total


def finish(report: dict, load_start: float, start: float, out_dir: str, name: str, plot_fn, table_fn) -> dict:
  """Adds the load and wall time to `report`, writes out_dir/name.json and .png, prints the table."""
  report['loadavg'] = [load_start, os.getloadavg()[0]]
  report['wall_s'] = time.perf_counter() - start
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    json.dump(report, f, indent=2)
  plot_fn(report, os.path.join(out_dir, f'{name}.png'))
  print(table_fn(report))
  print(f"\nwall time {report['wall_s']:.0f} s; wrote {out_dir}/{name}.json and .png")
  return report


def prepare_main(args: argparse.Namespace) -> dict:
  """In-process vs Beam prepare rows: documents/s, input MB/s, paired ratios, identical outputs."""
  from data import beam as data_beam  # pylint: disable=g-import-not-at-top
  from data import prepare  # pylint: disable=g-import-not-at-top
  data_beam.check_beam()
  import apache_beam  # pylint: disable=g-import-not-at-top
  from _engine_limits import probe_now  # pylint: disable=g-import-not-at-top
  workers = [int(w) for w in args.prepare_workers.split(',') if w.strip()]
  cores = len(os.sched_getaffinity(0))
  probes = {'start': probe_now(cores)}  # a cpu share under 90%: the ratios are not results
  log(probes['start'])
  load_start, start = os.getloadavg()[0], time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, 'src')
    nbytes = write_text_corpus(src, args.prepare_documents, args.prepare_files, args.seed)
    sample = prepare.PrepareConfig(source=src, train_tokenizer=True, vocab_size=4096, tokenizer_sample=2000)
    prepare.prepare(sample, os.path.join(tmp, 'tokenizer'))
    cfg = prepare.PrepareConfig(source=os.path.join(src, '*.jsonl'),
                                tokenizer=os.path.join(tmp, 'tokenizer', 'tokenizer.json'))
    rows = {'in-process': lambda out: prepare.prepare(cfg, out)}
    for w in workers:
      rows[f'beam, {w} worker{"s" if w > 1 else ""}'] = (
          lambda out, w=w: data_beam.prepare(cfg, out, num_workers=w))
    runs, outputs, count = {name: [] for name in rows}, {}, 0
    for r in range(args.prepare_runs):
      for name in (list(rows) if r % 2 == 0 else list(rows)[::-1]):
        out = os.path.join(tmp, f'out-{count}')
        count += 1
        clock = Clock()
        manifest = rows[name](out)
        runs[name].append(clock.stop()[0])
        files = {e['path']: e['sha256'] for split in manifest['splits'].values() for e in split['shards']}
        outputs.setdefault(name, files)
        shutil.rmtree(out)
        log(f'run {r + 1}/{args.prepare_runs} {name}: {runs[name][-1]:.2f} s')
    documents = manifest['documents']
  probes['end'] = probe_now(cores, when='end')
  log(probes['end'])
  ref = runs['in-process']
  report = {'date': datetime.date.today().isoformat(), 'cpu': cpu_name(), 'cpu_cores': os.cpu_count(),
            'python': platform.python_version(), 'apache_beam': apache_beam.__version__,
            'pyarrow': pa.__version__, 'tokenizers': metadata.version('tokenizers'),
            'settings': {k: v for k, v in vars(args).items() if k.startswith('prepare') or k == 'seed'},
            'documents': documents, 'input_bytes': nbytes, 'probes': probes, 'rows': {}}
  for name, seconds in runs.items():
    report['rows'][name] = {
        'seconds': seconds, 'median_seconds': statistics.median(seconds),
        'documents_per_sec': documents['read'] / statistics.median(seconds),
        'input_mb_per_sec': nbytes / 1e6 / statistics.median(seconds),
        'paired_ratio_vs_in_process': statistics.median(a / b for a, b in zip(ref, seconds)),
        'identical_to_in_process': outputs[name] == outputs['in-process']}
  return finish(report, load_start, start, args.out_dir, 'prepare_throughput', plot_prepare, prepare_table)


def prepare_table(report: dict) -> str:
  d = report['documents']
  lines = [
      '`stoker prepare` throughput: in process vs Apache Beam (DirectRunner, multi-process)',
      f"{report['cpu']}, {report['cpu_cores']} cores; Python {report['python']}, apache-beam "
      f"{report['apache_beam']}, pyarrow {report['pyarrow']}, tokenizers {report['tokenizers']}; {report['date']}",
      f"corpus: {d['read']:,} documents ({d['duplicates']:,} duplicates) in "
      f"{report['settings']['prepare_files']} JSONL files, {report['input_bytes'] / 1e6:.1f} MB; a given "
      f"tokenizer; load average {report['loadavg'][0]:.1f} -> {report['loadavg'][1]:.1f}",
      '',
      f"{'row':<22}{'median s':>10}{'docs/s':>11}{'MB/s':>8}{'spread':>8}{'vs in-process':>15}{'identical':>11}"]
  for name, r in report['rows'].items():
    spread = (max(r['seconds']) - min(r['seconds'])) / r['median_seconds']
    lines.append(f"{name:<22}{r['median_seconds']:>10.2f}{r['documents_per_sec']:>11,.0f}"
                 f"{r['input_mb_per_sec']:>8.2f}{spread:>8.0%}{r['paired_ratio_vs_in_process']:>14.2f}x"
                 f"{'yes' if r['identical_to_in_process'] else 'NO':>11}")
  lines += ['', 'vs in-process: median over runs of the paired ratio of throughput (> 1: faster).',
            'identical: every shard\'s sha256 equals the in-process run\'s.',
            'Beam rows include starting the DirectRunner and its worker processes (seconds per run).',
            report['probes']['start'], report['probes']['end']]
  return '\n'.join(lines)


def plot_prepare(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(report['rows'])
  med = [r['documents_per_sec'] for r in report['rows'].values()]
  fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.6))
  y = np.arange(len(names))[::-1]
  ax.barh(y, med, color=['tab:gray'] + ['tab:blue'] * (len(names) - 1))
  for yi, v, r in zip(y, med, report['rows'].values()):
    ax.annotate(f"{v:,.0f} ({r['paired_ratio_vs_in_process']:.2f}x)", (v, yi), xytext=(4, 0),
                textcoords='offset points', va='center', fontsize=8)
  ax.set_yticks(y, names, fontsize=8)
  ax.set_xlabel('documents/s (median run)')
  ax.set_xlim(right=max(med) * 1.4)
  ax.set_title(f"stoker prepare: in process vs Beam\n{report['cpu']}, {report['cpu_cores']} cores; "
               f"{report['date']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
