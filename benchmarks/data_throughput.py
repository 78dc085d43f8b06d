"""Data pipeline throughput: tokens/s the Grain pipeline delivers, against what training consumes
and against a plain pyarrow loop over the same shards.

  python benchmarks/data_throughput.py                       # tiny + small, ~4 min on 2 CPU cores
  python benchmarks/data_throughput.py --presets tiny --runs 3
  python benchmarks/data_throughput.py --data_dir runs/data  # a `stoker prepare` directory
  python benchmarks/data_throughput.py --prepare             # `stoker prepare`: in process vs Beam

Corpus: --data_dir, or else a synthetic prepared directory in the format `stoker prepare` writes
(manifest.json, train/shard-*.parquet: tokens list<int32> with EOS last, row groups of 256 rows,
zstd), with --documents documents of log-normal length (median --median_doc_len tokens).

Rows, all over the train split:
- pyarrow: a plain sequential loop, `read_row_group(g, columns=['tokens'])` -> numpy, shard by
  shard. It does no shuffling and no packing: the I/O and decode ceiling.
- grain: `data.pipeline.make_iterator` (global shuffle, first-fit packing, one process) at each
  preset's training shape, with 0 workers (prefetch thread) and with --workers worker processes.
  The `cache off` row keeps one decoded row group per process: what a corpus much larger than
  the cache costs (one row-group decode per document).
- train: the preset's train step as configs/train/<preset>_cpu.gin sets it up (tiny: batch 16 x
  128 on mesh (8,1,1); small: 8 x 256 on (2,2,2), 2 microbatches) on --host_devices fake CPU
  devices, fed with the pipeline's own batches: the tokens/s training consumes on this machine.

tokens/s counts batch slots (B x T per batch, padding included), the unit training consumes;
doc tok/s counts document tokens only. Headroom = grain tokens/s / train tokens/s at the same
shape; it must be >= 10x for tiny. Every reader has one untimed warm-up run; then pipeline and
pyarrow runs are interleaved, with the order alternating, and `vs pyarrow` is the median over
runs of the paired ratio of document tokens/s.
Writes benchmarks/out/data_throughput.{json,png}.

--prepare: `stoker prepare` throughput instead, in process and as a Beam pipeline (data/beam.py) on the
DirectRunner with 1 and 2 worker processes (--prepare_workers), over --prepare_files JSONL files of
--prepare_documents synthetic documents (5% of them repeated in another file), all with one --tokenizer
trained beforehand (BPE training is one step on one worker in both paths; it is left out). Runs are
interleaved with the order alternating; `vs in-process` is the median paired ratio of documents/s. Every
row's shards must be byte-identical to the in-process ones. Needs Apache Beam (the beam extra:
pyarrow < 26, protobuf < 7). Writes benchmarks/out/prepare_throughput.{json,png}.
"""

from __future__ import annotations

import argparse
import os

TRAIN = {'tiny': dict(gin='train/tiny_cpu.gin', steps=3), 'small': dict(gin='train/small_cpu.gin', steps=1)}
BUSY_CPU_SHARE = 0.85  # below this median share of one core, a single-process row was disturbed
REQUIRED_HEADROOM = {'tiny': 10.0}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--presets', default='tiny,small', help=f'comma-separated, of {sorted(TRAIN)}')
  p.add_argument('--data_dir', help='a `stoker prepare` directory (default: a synthetic corpus)')
  p.add_argument('--documents', type=int, default=20_000, help='synthetic corpus: documents')
  p.add_argument('--median_doc_len', type=int, default=300, help='synthetic corpus: median length')
  p.add_argument('--workers', type=int, default=2, help='worker processes for the second grain row')
  p.add_argument('--batches', type=int, default=200, help='grain batches per timed run')
  p.add_argument('--runs', type=int, default=5, help='timed pyarrow/grain runs; medians are quoted')
  p.add_argument('--train_runs', type=int, default=3, help='timed runs of the train step')
  p.add_argument('--host_devices', type=int, default=8, help='fake CPU devices for the train step')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  p.add_argument('--prepare', action='store_true', help='measure `stoker prepare` (in process vs Beam) instead')
  p.add_argument('--prepare_documents', type=int, default=40_000, help='--prepare: documents')
  p.add_argument('--prepare_files', type=int, default=16, help='--prepare: input files')
  p.add_argument('--prepare_workers', default='1,2', help='--prepare: Beam DirectRunner worker counts')
  p.add_argument('--prepare_runs', type=int, default=3, help='--prepare: timed runs of each row')
  args = p.parse_args(argv)
  for name in ('documents', 'median_doc_len', 'batches', 'runs', 'train_runs', 'host_devices',
               'prepare_documents', 'prepare_files', 'prepare_runs'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}.')
  if args.workers < 0:
    p.error(f'--workers must be >= 0, got {args.workers}.')
  unknown = set(args.presets.split(',')) - set(TRAIN)
  if unknown:
    p.error(f'--presets: unknown {sorted(unknown)}; choose from {sorted(TRAIN)}.')
  return args


from _common import Clock, cpu_name, log, set_host_devices  # pylint: disable=g-import-not-at-top


if __name__ == '__main__':
  ARGS = parse_args()
  set_host_devices(ARGS.host_devices)

# pylint: disable=wrong-import-position  (jax must start after XLA_FLAGS is set)
import datetime  # noqa: E402
import hashlib  # noqa: E402
from importlib import metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from data.pipeline import make_iterator  # noqa: E402
from data.source import read_manifest  # noqa: E402
from _prepare_throughput import finish, prepare_main  # noqa: E402


# ----------------------------------------------------------------------------- corpus


def write_corpus(root: str, documents: int, median_len: int, vocab: int, seed: int,
                 shards: int = 4, row_group: int = 256) -> None:
  """A synthetic `stoker prepare` directory (train split only): random tokens, EOS = vocab - 1."""
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(np.log(median_len), 1.0, documents), 2, 50 * median_len)
  lengths = lengths.astype(np.int64)
  os.makedirs(os.path.join(root, 'train'))
  entries, bounds = [], np.linspace(0, documents, shards + 1).astype(int)
  for s in range(shards):
    lo, hi = bounds[s], bounds[s + 1]
    offsets = np.concatenate([[0], np.cumsum(lengths[lo:hi])]).astype(np.int32)
    values = rng.integers(0, vocab - 1, int(offsets[-1]), dtype=np.int32)
    values[offsets[1:] - 1] = vocab - 1  # EOS ends every document
    table = pa.table({'tokens': pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                      'doc_id': pa.array(np.arange(lo, hi), pa.int64())})
    rel = f'train/shard-{s:05d}-of-{shards:05d}.parquet'
    path = os.path.join(root, rel)
    pq.write_table(table, path, row_group_size=row_group, compression='zstd')
    with open(path, 'rb') as f:
      sha = hashlib.sha256(f.read()).hexdigest()
    entries.append({'path': rel, 'rows': int(hi - lo), 'tokens': int(offsets[-1]),
                    'row_groups': pq.read_metadata(path).num_row_groups, 'sha256': sha})
  manifest = {'format': 'stoker-tokens-v1', 'eos_id': vocab - 1,
              'tokenizer': {'vocab_size': vocab},
              'splits': {'train': {'documents': documents, 'tokens': int(lengths.sum()),
                                   'shards': entries}}}
  with open(os.path.join(root, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=2)


def corpus_info(data_dir: str) -> dict:
  split = read_manifest(data_dir)['splits']['train']
  paths = [os.path.join(data_dir, s['path']) for s in split['shards']]
  return {'documents': split['documents'], 'tokens': split['tokens'], 'shards': len(paths),
          'row_groups': sum(pq.read_metadata(p).num_row_groups for p in paths),
          'bytes': sum(os.path.getsize(p) for p in paths),
          'vocab_size': read_manifest(data_dir)['tokenizer']['vocab_size']}


# ----------------------------------------------------------------------------- readers


def pyarrow_run(data_dir: str) -> dict:
  """One sequential pass: every row group of every train shard, tokens to numpy."""
  split = read_manifest(data_dir)['splits']['train']
  clock, tokens = Clock(), 0
  for shard in split['shards']:
    pf = pq.ParquetFile(os.path.join(data_dir, shard['path']))
    for g in range(pf.num_row_groups):
      column = pf.read_row_group(g, columns=['tokens']).column('tokens')
      for chunk in column.chunks:
        tokens += chunk.values.to_numpy().size
  wall, cpu = clock.stop()
  return {'seconds': wall, 'cpu': cpu, 'slots': tokens, 'doc_tokens': tokens}


def grain_run(it, batches: int) -> dict:
  clock, slots, doc_tokens = Clock(), 0, 0
  for _ in range(batches):
    b = next(it)
    slots += b['segment_ids'].size
    doc_tokens += int(np.count_nonzero(b['segment_ids']))
  wall, cpu = clock.stop()
  return {'seconds': wall, 'cpu': cpu, 'slots': slots, 'doc_tokens': doc_tokens}


def measure_readers(data_dir: str, args, shapes: dict[str, tuple[int, int]]) -> dict:
  """pyarrow and grain rows, runs interleaved with alternating order."""
  readers, setup, workers = {'pyarrow': lambda: pyarrow_run(data_dir)}, {}, {'pyarrow': 0}
  iterators = []
  for preset, (B, T) in shapes.items():
    variants = [('0 workers', dict(worker_count=0))]
    if args.workers:
      variants.append((f'{args.workers} workers', dict(worker_count=args.workers)))
    variants.append(('0 workers, cache off', dict(worker_count=0, cache_bytes=0)))
    for label, kwargs in variants:
      name = f'grain {B}x{T}, {label}'
      clock = Clock()
      it = make_iterator(data_dir, 'train', seq_len=T, global_batch_size=B, seed=args.seed,
                         process_index=0, process_count=1, **kwargs)
      next(it)  # opens the shards, starts the workers
      setup[name], workers[name] = clock.stop()[0], kwargs['worker_count']
      iterators.append(it)
      readers[name] = (lambda it=it: grain_run(it, args.batches))
      log(f'{name}: ready in {setup[name]:.1f} s')
  for name, read in readers.items():
    read()  # untimed warm-up: fills the OS page cache and the row-group caches
  runs = {name: [] for name in readers}
  order = list(readers)
  for r in range(args.runs):
    for name in (order if r % 2 == 0 else order[::-1]):
      runs[name].append(readers[name]())
    log(f'run {r + 1}/{args.runs}: ' + ', '.join(
        f'{k} {v[-1]["slots"] / v[-1]["seconds"]:,.0f}' for k, v in runs.items()))
  for it in iterators:
    it.close()
  ref = runs['pyarrow']
  out = {}
  for name, rs in runs.items():
    tps = [x['slots'] / x['seconds'] for x in rs]
    dps = [x['doc_tokens'] / x['seconds'] for x in rs]
    out[name] = {
        'tokens_per_sec': tps, 'doc_tokens_per_sec': dps,
        'median_tokens_per_sec': statistics.median(tps),
        'median_doc_tokens_per_sec': statistics.median(dps),
        'packing_efficiency': sum(x['doc_tokens'] for x in rs) / sum(x['slots'] for x in rs),
        'median_cpu_share': statistics.median(x['cpu'] for x in rs),
        'paired_ratio_vs_pyarrow': statistics.median(
            (x['doc_tokens'] / x['seconds']) / (y['doc_tokens'] / y['seconds'])
            for x, y in zip(rs, ref)),
        'setup_s': setup.get(name),
        'single_process': workers[name] == 0,
    }
  return out


# ----------------------------------------------------------------------------- training


def measure_train(preset: str, data_dir: str, args) -> dict:
  """The preset's train step (its configs/train gin file) on pipeline batches: tokens/s consumed."""
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  import configs  # pylint: disable=g-import-not-at-top
  from parallelism.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from train.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from train.step import batch_spec, compile_train_step, init_train_state  # pylint: disable=g-import-not-at-top

  spec = TRAIN[preset]
  cfg = configs.load_train_config([spec['gin']])
  vocab = read_manifest(data_dir)['tokenizer']['vocab_size']
  if vocab > cfg.model.vocab_size:
    raise ValueError(f'{data_dir} has a {vocab}-token vocabulary; the {preset} preset has '
                     f'{cfg.model.vocab_size}.')
  mesh = make_mesh(cfg.mesh)
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  state, shardings = init_train_state(cfg, mesh, tx)
  clock = Clock()
  step = compile_train_step(cfg, mesh, tx, shardings)
  compile_s = clock.stop()[0]
  sharding = {k: v.sharding for k, v in batch_spec(cfg, mesh).items()}
  total = 1 + args.train_runs * spec['steps']
  with make_iterator(data_dir, 'train', seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
                     seed=args.seed, process_index=0, process_count=1) as it:
    host = [next(it) for _ in range(total)]
  batches = [{k: jax.make_array_from_process_local_data(sharding[k], np.asarray(b[k]))
              for k in sharding} for b in host]
  log(f'[train {preset}] compiled in {compile_s:.1f} s on mesh {dict(mesh.shape)}; '
      f'{cfg.batch_size}x{cfg.seq_len}, {cfg.microbatches} microbatch(es)')
  clock = Clock()
  state, metrics = step(state, batches[0])  # warm-up
  jax.block_until_ready(metrics)
  warmup_s = clock.stop()[0]
  runs, losses = [], [float(metrics['loss'])]
  for r in range(args.train_runs):
    chunk = batches[1 + r * spec['steps']:1 + (r + 1) * spec['steps']]
    clock = Clock()
    for b in chunk:
      state, metrics = step(state, b)
    jax.block_until_ready((state, metrics))
    runs.append(clock.stop())
    losses.append(float(metrics['loss']))
    log(f'[train {preset}] run {r + 1}/{args.train_runs}: {runs[-1][0] / spec["steps"]:.2f} s/step')
  tokens = cfg.batch_size * cfg.seq_len * spec['steps']
  tps = [tokens / w for w, _ in runs]
  return {'preset': preset, 'gin': spec['gin'], 'batch_size': cfg.batch_size,
          'seq_len': cfg.seq_len, 'microbatches': cfg.microbatches, 'mesh': dict(mesh.shape),
          'steps_per_run': spec['steps'], 'tokens_per_sec': tps,
          'median_tokens_per_sec': statistics.median(tps),
          'median_step_time_s': statistics.median(w / spec['steps'] for w, _ in runs),
          'median_cpu_share': statistics.median(c for _, c in runs),
          'setup_s': compile_s + warmup_s, 'losses': losses}


# ----------------------------------------------------------------------------- report


def machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  cpu = cpu_name()
  return {'cpu': cpu, 'cpu_cores': os.cpu_count(), 'jax_backend': jax.default_backend(),
          'jax_devices': jax.device_count(), 'python': platform.python_version(),
          'jax': jax.__version__, 'grain': metadata.version('grain'), 'pyarrow': pa.__version__}


def table(report: dict) -> str:
  m, c = report['machine'], report['corpus']
  lines = [
      'Data throughput: Stoker Grain pipeline vs training consumption and a plain pyarrow loop',
      f"{m['cpu']}, {m['cpu_cores']} cores; JAX {m['jax']} ({m['jax_devices']} {m['jax_backend']} "
      f"devices), grain {m['grain']}, pyarrow {m['pyarrow']}; {report['date']}",
      f"corpus: {report['corpus_kind']}, {c['documents']:,} documents, {c['tokens']:,} tokens, "
      f"{c['shards']} shards, {c['row_groups']} row groups, {c['bytes'] / 1e6:.1f} MB; "
      f"load average {report['loadavg'][0]:.1f} -> {report['loadavg'][1]:.1f}",
      '',
      f"{'row':<36}{'tokens/s':>12}{'doc tok/s':>13}{'pack':>7}{'cpu':>6}{'spread':>8}"
      f"{'vs pyarrow':>12}{'headroom':>10}{'setup s':>9}",
  ]
  for name, r in report['readers'].items():
    spread = ((max(r['tokens_per_sec']) - min(r['tokens_per_sec'])) / r['median_tokens_per_sec'])
    head = report['headroom'].get(name)
    lines.append(
        f"{name:<36}{r['median_tokens_per_sec']:>12,.0f}{r['median_doc_tokens_per_sec']:>13,.0f}"
        f"{r['packing_efficiency']:>7.1%}"
        + (f"{r['median_cpu_share']:>6.0%}" if r['single_process'] else f"{'-':>6}")
        + f"{spread:>8.0%}{r['paired_ratio_vs_pyarrow']:>11.4f}x"
        + (f"{head:>9,.0f}x" if head else f"{'':>10}")
        + (f"{r['setup_s']:>9.1f}" if r['setup_s'] is not None else ''))
  for t in report['train']:
    name = f"train {t['preset']} {t['batch_size']}x{t['seq_len']} ({t['gin'].split('/')[-1]})"
    spread = (max(t['tokens_per_sec']) - min(t['tokens_per_sec'])) / t['median_tokens_per_sec']
    lines.append(f"{name:<36}{t['median_tokens_per_sec']:>12,.0f}{'':>13}{'':>7}"
                 f"{t['median_cpu_share']:>6.0%}{spread:>8.0%}{'':>12}{'':>10}{t['setup_s']:>9.1f}")
  lines.append('')
  for t in report['train']:
    need = REQUIRED_HEADROOM.get(t['preset'])
    head = report['headroom'][t['grain_row']]
    verdict = f" (required >= {need:.0f}x: {'PASS' if head >= need else 'FAIL'})" if need else ''
    lines.append(f"{t['preset']}: the pipeline delivers {head:,.0f}x the {t['median_tokens_per_sec']:,.0f} "
                 f"tokens/s training consumes ({t['median_step_time_s']:.2f} s/step, mesh "
                 f"{tuple(t['mesh'].values())}){verdict}")
  lines += [
      '',
      'tokens/s: batch slots (B x T, padding included) per second; doc tok/s: document tokens.',
      'pack: document tokens / slots. cpu: this process\'s CPU time / wall time (100% = one core;',
      '  the train step may use every core; - for worker rows, whose work is in other processes).',
      'spread: (max - min) / median over runs.',
      'vs pyarrow: median over runs of the paired ratio of doc tok/s to the sequential loop\'s.',
      'headroom: the row\'s tokens/s / the train step\'s at the same shape (the verdict uses 0 workers).',
      'cache off: one decoded row group per process, the cost per document of a corpus much',
      '  larger than the cache under a global shuffle.',
  ]
  busy = [r['median_cpu_share'] for r in report['readers'].values() if r['single_process']]
  if busy and min(busy) < BUSY_CPU_SHARE:
    lines += ['', f'WARNING: a single-process row got {min(busy):.0%} of a core (< '
              f'{BUSY_CPU_SHARE:.0%}): the host was busy; rerun when idle before quoting ratios.']
  return '\n'.join(lines)


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (only the report needs it)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(report['readers']) + [f"train {t['preset']}" for t in report['train']]
  med = ([r['median_tokens_per_sec'] for r in report['readers'].values()]
         + [t['median_tokens_per_sec'] for t in report['train']])
  lo = ([min(r['tokens_per_sec']) for r in report['readers'].values()]
        + [min(t['tokens_per_sec']) for t in report['train']])
  hi = ([max(r['tokens_per_sec']) for r in report['readers'].values()]
        + [max(t['tokens_per_sec']) for t in report['train']])
  colors = ['tab:gray' if n == 'pyarrow' else 'tab:orange' if n.startswith('train') else 'tab:blue'
            for n in names]
  fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
  y = np.arange(len(names))[::-1]
  ax.barh(y, med, xerr=[np.subtract(med, lo), np.subtract(hi, med)], color=colors, capsize=3)
  for yi, n, v, top in zip(y, names, med, hi):
    head = report['headroom'].get(n)
    ax.annotate(f'{v:,.0f}' + (f'  ({head:,.0f}x train)' if head else ''), (top, yi),
                xytext=(4, 0), textcoords='offset points', va='center', fontsize=8)
  ax.set_yticks(y, names, fontsize=8)
  ax.set_xscale('log')
  ax.set_xlabel('tokens/s (median, min-max bars; log scale)')
  m = report['machine']
  ax.set_title(f"Data pipeline vs training consumption and pyarrow\n{m['cpu']}, {m['cpu_cores']} "
               f"cores; {report['date']}", fontsize=10)
  ax.set_xlim(right=max(hi) * 30)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(args: argparse.Namespace) -> dict:
  start = time.perf_counter()
  load_start = os.getloadavg()[0]
  presets = [p.strip() for p in args.presets.split(',') if p.strip()]
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    if data_dir is None:
      data_dir = os.path.join(tmp, 'corpus')
      clock = Clock()
      write_corpus(data_dir, args.documents, args.median_doc_len, vocab=4096, seed=args.seed)
      log(f'wrote the synthetic corpus in {clock.stop()[0]:.1f} s')
    import configs  # pylint: disable=g-import-not-at-top
    shapes = {}
    for p in presets:
      cfg = configs.load_train_config([TRAIN[p]['gin']])
      shapes[p] = (cfg.batch_size, cfg.seq_len)
    readers = measure_readers(data_dir, args, shapes)
    train = []
    for p in presets:
      train.append(measure_train(p, data_dir, args))
      train[-1]['grain_row'] = f'grain {shapes[p][0]}x{shapes[p][1]}, 0 workers'
    report = {'date': datetime.date.today().isoformat(), 'machine': machine(),
              'corpus_kind': 'synthetic' if args.data_dir is None else args.data_dir,
              'corpus': corpus_info(data_dir),
              'settings': {k: v for k, v in vars(args).items() if k != 'out_dir'},
              'readers': readers, 'train': train}
  report['headroom'] = {}
  for t in train:
    B, T = t['batch_size'], t['seq_len']
    for name, r in readers.items():
      if name.startswith(f'grain {B}x{T},'):
        report['headroom'][name] = r['median_tokens_per_sec'] / t['median_tokens_per_sec']
  return finish(report, load_start, start, args.out_dir, 'data_throughput', plot, table)


if __name__ == '__main__':
  prepare_main(ARGS) if ARGS.prepare else main(ARGS)
