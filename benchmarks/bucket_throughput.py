"""The Grain pipeline reading its shards from a bucket with latency added to every storage request, against
what the tiny preset's training consumes (issue 24, acceptance 4: >= 10x with 50 ms per request).

  python benchmarks/bucket_throughput.py                          # gs:// and s3://, 50 ms, ~3 min on 2 cores
  python benchmarks/bucket_throughput.py --schemes gs --delay_ms 50 --runs 3
  python benchmarks/bucket_throughput.py --documents 400 --batches 4 --runs 1 --train_runs 1   # smoke test

The servers are the test suite's (tests/storage/servers.py): gcp-storage-emulator for gs:// and moto's S3
server for s3://, on 127.0.0.1, each behind a proxy that sleeps --delay_ms before forwarding every request
(so a request costs at least that, as across a region). The corpus is benchmarks/data_throughput.py's
synthetic `stoker prepare` directory (--documents documents, row groups of 256), uploaded once.

Rows:
- bucket, W workers: `data.pipeline.make_iterator` over the bucket directory at the tiny preset's training
  shape (global shuffle, packing), a fresh iterator per run, so every run pays its cold reads (one ranged
  GET per row group first touched); --batches batches per run, timed after the set-up (manifest, footers,
  first batch, worker start-up: reported as setup_s, paid once per training run).
- local, 0 workers: the same over the local copy (the I/O-free reference).
- train: the tiny preset's train step (configs/train/tiny_cpu.gin) on --host_devices fake CPU devices:
  the tokens/s training consumes (data_throughput.measure_train).
Headroom = bucket tokens/s / train tokens/s; acceptance needs >= 10x. tokens/s counts batch slots (B x T).
Runs are interleaved with the order alternating; medians are quoted. Writes benchmarks/out/bucket_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.storage, data, ...


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  p.add_argument('--schemes', default='gs,s3', help='comma-separated: gs, s3')
  p.add_argument('--delay_ms', type=float, default=50.0, help='latency added to every storage request')
  p.add_argument('--documents', type=int, default=20_000, help='synthetic corpus: documents')
  p.add_argument('--median_doc_len', type=int, default=300, help='synthetic corpus: median length')
  p.add_argument('--workers', default='0,2', help='comma-separated Grain worker counts for the bucket rows')
  p.add_argument('--batches', type=int, default=100, help='batches per timed run')
  p.add_argument('--runs', type=int, default=3, help='timed runs of each row')
  p.add_argument('--train_runs', type=int, default=3, help='timed runs of the train step')
  p.add_argument('--host_devices', type=int, default=8, help='fake CPU devices for the train step')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  args = p.parse_args(argv)
  for name in ('documents', 'median_doc_len', 'batches', 'runs', 'train_runs', 'host_devices'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}.')
  if args.delay_ms < 0:
    p.error(f'--delay_ms must be >= 0, got {args.delay_ms}.')
  if set(args.schemes.split(',')) - {'gs', 's3'}:
    p.error(f'--schemes: gs and/or s3, got {args.schemes!r}.')
  return args


from _common import Clock, log, set_host_devices  # pylint: disable=g-import-not-at-top  # noqa: E402

if __name__ == '__main__':
  ARGS = parse_args()
  set_host_devices(ARGS.host_devices)

# pylint: disable=wrong-import-position  (jax must start after XLA_FLAGS is set)
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import data_throughput  # noqa: E402
import storage  # noqa: E402
from data.pipeline import make_iterator  # noqa: E402
from tests.storage import servers  # noqa: E402

TINY = 'tiny'


def upload(local: str, url: str) -> None:
  for directory, _, names in os.walk(local):
    for name in names:
      rel = os.path.relpath(os.path.join(directory, name), local)
      storage.put_file(os.path.join(directory, name), storage.join(url, *rel.split(os.sep)))


def point_at(scheme: str, endpoint: str) -> None:
  """Stoker (this process and the Grain workers it starts) at `endpoint` for `scheme`."""
  if scheme == 'gs':
    os.environ['STORAGE_EMULATOR_HOST'] = endpoint
  else:
    os.environ.update(AWS_ENDPOINT_URL=endpoint, **servers.S3_CREDENTIALS)


def read_run(data_dir: str, shape: tuple[int, int], workers: int, args) -> dict:
  """One fresh iterator: its set-up (the manifest, every shard's footer, the first batch, worker start-up)
  timed apart, then --batches batches, whose time includes the cold reads of the row groups they touch."""
  batch, seq_len = shape
  clock = Clock()
  it = make_iterator(data_dir, 'train', seq_len=seq_len, global_batch_size=batch, seed=args.seed,
                     process_index=0, process_count=1, worker_count=workers)
  next(it)
  setup_s = clock.stop()[0]
  result = data_throughput.grain_run(it, args.batches)
  it.close()
  return {'setup_s': setup_s, 'seconds': result['seconds'], 'slots': result['slots'],
          'tokens_per_sec': result['slots'] / result['seconds']}


def main(args: argparse.Namespace) -> dict:
  import configs  # pylint: disable=g-import-not-at-top
  cfg = configs.load_train_config([data_throughput.TRAIN[TINY]['gin']])
  shape = (cfg.batch_size, cfg.seq_len)
  workers = [int(w) for w in args.workers.split(',') if w.strip()]
  report = {'settings': vars(args), 'shape': shape, 'rows': {}, 'loadavg': [os.getloadavg()[0]]}
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, 'corpus')
    data_throughput.write_corpus(local, args.documents, args.median_doc_len, vocab=4096, seed=args.seed)
    rows, procs = {'local, 0 workers': lambda: read_run(local, shape, 0, args)}, []
    try:
      for scheme in args.schemes.split(','):
        process, endpoint = servers.start('gcs' if scheme == 'gs' else 's3', os.path.join(tmp, f'{scheme}.log'))
        procs.append(process)
        bucket = f'stoker-bench-{scheme}'
        servers.make_bucket(scheme, endpoint, bucket)
        point_at(scheme, endpoint)
        upload(local, f'{scheme}://{bucket}/data')
        proxy = servers.Proxy(endpoint, delay_s=args.delay_ms / 1000).__enter__()
        point_at(scheme, proxy.url)  # every request from here on pays the delay
        for w in workers:
          rows[f'{scheme}:// +{args.delay_ms:g} ms, {w} workers'] = (
              lambda s=scheme, b=bucket, w=w: read_run(f'{s}://{b}/data', shape, w, args))
      runs = {name: [] for name in rows}
      order = list(rows)
      for r in range(args.runs):
        for name in (order if r % 2 == 0 else order[::-1]):
          runs[name].append(rows[name]())
        log(f'run {r + 1}/{args.runs}: ' + ', '.join(f'{k} {v[-1]["tokens_per_sec"]:,.0f}' for k, v in runs.items()))
      train = data_throughput.measure_train(TINY, local, args)
    finally:
      for process in procs:
        process.kill()
  consumed = train['median_tokens_per_sec']
  for name, rs in runs.items():
    median = statistics.median(r['tokens_per_sec'] for r in rs)
    report['rows'][name] = {'tokens_per_sec': [r['tokens_per_sec'] for r in rs], 'median_tokens_per_sec': median,
                            'headroom_vs_train': median / consumed,
                            'median_setup_s': statistics.median(r['setup_s'] for r in rs)}
  report['train'] = train
  report['loadavg'].append(os.getloadavg()[0])
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'bucket_throughput.json'), 'w') as f:
    json.dump(report, f, indent=2, default=str)
  print(f'tiny preset training consumes {consumed:,.0f} tokens/s ({shape[0]}x{shape[1]} per step)')
  print(f'{"row":40s} {"tokens/s":>12s} {"headroom":>9s} {"set-up":>8s}')
  for name, row in report['rows'].items():
    print(f'{name:40s} {row["median_tokens_per_sec"]:>12,.0f} {row["headroom_vs_train"]:>8.1f}x '
          f'{row["median_setup_s"]:>7.1f}s')
  tiny_ok = all(r['headroom_vs_train'] >= 10 for n, r in report['rows'].items() if '://' in n)
  print(f'bucket rows >= 10x the tiny preset\'s consumption: {"PASS" if tiny_ok else "FAIL"}')
  print(f'load average {report["loadavg"][0]:.1f} -> {report["loadavg"][1]:.1f}; wrote '
        f'{args.out_dir}/bucket_throughput.json')
  return report


if __name__ == '__main__':
  main(ARGS)
