"""`stoker profile`: times the engine's real step on this backend, the data the step-time
estimator (serve/sim/estimator.py) is fitted on.

Re-measure the shipped tiny CPU profile (on a quiet machine, load average < 1; a few minutes):
  stoker profile --out serve/sim/profiles/tiny_cpu
(the tiny preset with random weights, and the EngineConfig `stoker serve` runs with no gin file).

Each grid point is one step composition, timed as one period of the serving loop (Engine.step in
steady state, see serve/sim/probe.py): wall_s is the median (wall_min_s the least) of `repeats`
samples taken in separate passes over the whole grid, each pass in a new random order, so slow
drifts of the machine's load spread over every point alike; device_s is the median time of the
compiled step alone (block_until_ready). The grid (`grid_for`, from the EngineConfig):
  decode   b sequences decoding at context c
  prefill  one chunk of q tokens after c cached tokens (a shared prefix the prefix cache holds;
           without prefix caching c is a multiple of the token budget, built by whole-budget chunks)
  mixed    b decodes plus a new prompt's chunk of q tokens (Sarathi-style stall-free steps; the
           chunked policy only: the others never mix)
  after    b decodes right after a step of P tokens, P each bucket above the smallest (prev_tokens P;
           that step is the b decodes and a new prompt's chunk, or with prefill-first the chunk alone)
  wake     after each idle gap of wake_gaps, one request's steps (two prompt chunks, then decodes) against
           the same steps back to back (serve/sim/wake.py: how much slower a machine runs after idling)
Files in --out (a local directory, gs://BUCKET/PATH or s3://BUCKET/PATH; storage/): steps.csv (one row
per grid point), host.csv (Scheduler.schedule and update and the engine's host buffers per step, against
batch size), wake.csv and meta.json (device, backend, model and engine configs, jax version, date, load average
before and after, grid), meta.json last. An unusable bucket stops the command before it measures.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import enum
import json
import os
import platform
import sys
import time

import jax

import storage
from models.config import ModelConfig
from parallelism.compile_cache import use_compilation_cache
from serve import loader
from serve.engine import Engine, EngineConfig
from serve.scheduler import StepPlan
from serve.sim import estimator, probe, wake

STEP_FIELDS = ('kind', 'q_lens', 'kv_lens', 'prev_tokens', 'num_seqs', 'num_decodes', 'tokens', 'bucket', 'wall_s',
               'wall_min_s', 'device_s', 'repeats')


@dataclasses.dataclass(frozen=True)
class Grid:
  decode_batches: tuple[int, ...]
  decode_contexts: tuple[int, ...]  # kept where the pool and block table hold b of them
  prefill_chunks: tuple[int, ...]
  prefill_cached: tuple[int, ...]  # page-aligned; only token_budget multiples without prefix caching
  mixed_decodes: tuple[int, ...]
  mixed_chunks: tuple[int, ...]  # cut to the budget the decodes leave
  repeats: int = 5  # passes over the grid
  after_decodes: tuple[int, ...] = ()
  after_buckets: tuple[int, ...] = ()  # token counts of the step before
  wake_gaps: tuple[float, ...] = ()  # idle gaps (s) before the steps wake.csv times (serve/sim/wake.py)
  wake_repeats: int = 12  # passes over them (a wake's slowdown varies widely from one to the next)


def grid_for(cfg: EngineConfig, quick: bool = False) -> Grid:
  """The grid for an engine config: batch sizes up to max_seqs, contexts up to the block table,
  chunks at and between the buckets. quick: a handful of points (seconds on CPU, for tests)."""
  max_len, budget, G = cfg.max_pages_per_seq * cfg.page_size, cfg.token_budget, cfg.page_size
  after = cfg.buckets()[1:]
  if quick:
    return Grid((1, cfg.max_seqs), (2 * G,), (cfg.min_bucket, budget),
                tuple(c for c in (0, budget) if c + budget < max_len), (1,), (cfg.min_bucket,), 3,
                (1,), after[-1:], (0.02,), 2)
  batches = sorted({1, 2, 4, 8, 12, 16, cfg.max_seqs} & set(range(1, cfg.max_seqs + 1)))
  contexts = sorted({c for c in (G, 4 * G, 16 * G, 32 * G) if c < max_len} | {max_len - 2 * G})
  chunks = sorted(set(cfg.buckets()) | {3 * b // 4 for b in cfg.buckets() if b >= 4 * cfg.min_bucket})
  step = G if cfg.prefix_caching else budget
  cached = sorted({f * max_len // 8 // step * step for f in (0, 1, 2, 4, 6)})
  mixed = sorted({1, max(1, cfg.max_seqs // 4), cfg.max_seqs - 1} - {0})
  return Grid(tuple(batches), tuple(contexts), tuple(chunks), tuple(cached), tuple(mixed),
              (cfg.min_bucket, budget // 4, budget // 2, budget), after_decodes=(1, max(1, cfg.max_seqs // 2)),
              after_buckets=after, wake_gaps=wake.GAPS_S)


def _jsonable(cfg) -> dict:
  return {k: v.value if isinstance(v, enum.Enum) else dataclasses.asdict(v)
          if dataclasses.is_dataclass(v) else v for k, v in dataclasses.asdict(cfg).items()}


def _write_csv(path: str, fields, rows) -> None:
  with storage.open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def profile(model_cfg: ModelConfig, engine_cfg: EngineConfig, out_dir: str, *, quick: bool = False,
            grid: Grid | None = None, mesh=None, params=None, seed: int = 0) -> dict:
  """Measures the grid on this backend and writes steps.csv, host.csv and meta.json to out_dir.
  Returns the meta dict. params: random weights of model_cfg unless given."""
  grid = grid or grid_for(engine_cfg, quick)
  load_before = os.getloadavg()
  start = time.time()
  engine = Engine(model_cfg, probe.random_params(model_cfg, seed) if params is None else params,
                  engine_cfg, mesh)
  for T in engine_cfg.buckets():  # the first run of each compiled step allocates; keep it out
    probe.device_time(engine, StepPlan((), ()), 0, T)
  rows = probe.measure(engine, grid, seed)
  host = probe.host_overhead(engine, grid.decode_batches)
  woken = wake.measure(engine, grid.wake_gaps, grid.wake_repeats, seed) if grid.wake_gaps else []
  device = jax.devices()[0]
  meta = dict(
      device_kind=device.device_kind, backend=jax.default_backend(), num_devices=jax.device_count(),
      tensor_parallel=1 if mesh is None else int(mesh.shape.get('tensor', 1)),
      model=_jsonable(model_cfg), engine=_jsonable(engine_cfg), num_params=model_cfg.num_params(),
      jax_version=jax.__version__, python=platform.python_version(), machine=platform.machine(),
      cpu_count=os.cpu_count(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      duration_s=round(time.time() - start, 1), compile_s=round(engine.stats['compile_s'], 2),
      loadavg_before=[round(x, 2) for x in load_before],
      loadavg_after=[round(x, 2) for x in os.getloadavg()],
      command=' '.join(['stoker'] + sys.argv[1:]) if os.path.basename(sys.argv[0]) in ('stoker', 'cli.py') else None,
      quick=quick, grid=dataclasses.asdict(grid), steps_rows=len(rows), host_rows=len(host),
      wake_rows=len(woken))
  write(out_dir, rows, host, meta, woken)
  return meta


def write(out_dir: str, rows, host, meta: dict, woken=()) -> None:
  """steps.csv, host.csv, wake.csv (if any rows), then meta.json (written last: a profile with it is
  complete) into out_dir."""
  storage.makedirs(out_dir)
  _write_csv(storage.join(out_dir, 'steps.csv'), STEP_FIELDS, rows)
  _write_csv(storage.join(out_dir, 'host.csv'), probe.HOST_FIELDS, host)
  if woken:
    _write_csv(storage.join(out_dir, 'wake.csv'), wake.FIELDS, woken)
  with storage.open(storage.join(out_dir, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)


def add_arguments(p: argparse.ArgumentParser) -> None:
  """`stoker profile`'s flags."""
  p.add_argument('--out', required=True, help='Directory to write (created; files replaced): a local path, '
                 'gs://BUCKET/PATH or s3://BUCKET/PATH.')
  p.add_argument('--model', default=None,
                 help="A model preset (models/presets.py; default: a gin file's model.name, else tiny).")
  p.add_argument('--gin_file', action='append', default=[],
                 help='A gin file binding engine.* (EngineConfig, as for stoker serve) and model.*.')
  p.add_argument('--gin_param', action='append', default=[],
                 help="A binding such as 'engine.token_budget=512'; repeatable, applied last.")
  p.add_argument('--tensor_parallel', type=int, default=1,
                 help='Shard the model over this many devices, as stoker serve does.')
  p.add_argument('--quick', action='store_true', help='A handful of shapes (seconds on CPU; for tests).')


def profile_command(model_cfg: ModelConfig, engine_cfg: EngineConfig, out_dir: str, *,
                    quick: bool = False, tensor_parallel: int = 1) -> int:
  """`stoker profile`: profiles into `out_dir`, fits the estimator on it and prints both."""
  storage.check(out_dir, write=True)  # an unusable bucket fails now, not after minutes of measuring
  if engine_cfg.compilation_cache_dir is None:
    use_compilation_cache()
  meta = profile(model_cfg, engine_cfg, out_dir, quick=quick,
                 mesh=loader.serving_mesh(tensor_parallel))
  fitted = estimator.fit(estimator.load_profile(out_dir))
  print(f'Profiled {meta["num_params"]:,} parameters on {meta["device_kind"]} ({meta["backend"]}, '
        f'tensor parallel {meta["tensor_parallel"]}): {meta["steps_rows"]} step shapes in '
        f'{meta["duration_s"]:.0f} s, load average {meta["loadavg_before"][0]} -> '
        f'{meta["loadavg_after"][0]}. Wrote {out_dir}/steps.csv, host.csv, {"wake.csv, " if meta["wake_rows"] else ""}'
        'meta.json.\n'
        f'Fitted: {fitted.describe()}.')
  return 0
