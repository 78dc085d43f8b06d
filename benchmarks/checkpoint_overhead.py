"""What checkpointing costs and what it saves: just-in-time machinery vs the fused step, async vs
synchronous saves, and work lost per failure with periodic vs just-in-time checkpoints.

  python benchmarks/checkpoint_overhead.py                   # tiny + small, ~15 min on 2 CPU cores
  python benchmarks/checkpoint_overhead.py --presets tiny --runs 3
  python benchmarks/checkpoint_overhead.py --presets small --batch_scale 16   # GPU: ~50 ms steps

For each preset, in one process, on the same synthetic data:
  1. step time: the training loop (train/loop.py, synthetic data, no periodic saves) with
     checkpoint.just_in_time on (split step: gradients, wait, donated update) and off (one fused,
     donated step), runs alternating on/off; median per-step time of each (first 2 steps of a run
     excluded) and their ratio. Goal: within 1%.
  2. save blocking: how long Checkpoints.save blocks the loop with an async save vs a synchronous
     one (save + wait), median over --saves saves of the initial state (the first save of the
     process, which sets Orbax up, is reported apart).
  3. failures: --failures runs per mode fail (an injected step exception) at a step drawn uniformly
     from [c, 3c) and are resumed in-process. Periodic checkpoints every c steps without the
     just-in-time machinery vs with it. Lost work = steps recomputed after the restart (the failed
     step included); recovery = wall time from the failure to the resumed run's first finished step
     (the just-in-time save, restore, compile from JAX's persistent cache, first step).
Writes benchmarks/out/checkpoint_overhead.json. On a CPU only the ratios carry over to other
machines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

from _common import log, set_host_devices

# Per preset: batch, sequence length, timed steps per run, checkpoint interval c.
WORKLOADS = {'tiny': dict(batch_size=16, seq_len=128, steps=12, every=10),
             'small': dict(batch_size=8, seq_len=128, steps=6, every=4)}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--presets', default='tiny,small')
  p.add_argument('--runs', type=int, default=3, help='step-time runs per mode (alternating)')
  p.add_argument('--saves', type=int, default=5, help='timed saves per mode')
  p.add_argument('--failures', type=int, default=3, help='failures per mode (tiny; small: 1 fewer)')
  p.add_argument('--batch_scale', type=int, default=1,
                 help="multiply each preset's batch (on an accelerator: steps long enough that "
                      'dispatch does not dominate)')
  p.add_argument('--host_devices', type=int, default=8)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  set_host_devices(args.host_devices)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  work = tempfile.mkdtemp(prefix='stoker-ckpt-bench-')
  jax.config.update('jax_compilation_cache_dir', os.path.join(work, 'xla'))
  import configs  # pylint: disable=g-import-not-at-top
  from parallelism.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from train import faults  # pylint: disable=g-import-not-at-top
  from train.checkpoint import Checkpoints  # pylint: disable=g-import-not-at-top
  from train.config import CheckpointConfig  # pylint: disable=g-import-not-at-top
  from train.loop import train  # pylint: disable=g-import-not-at-top
  from train.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from train.step import init_train_state  # pylint: disable=g-import-not-at-top

  runs = iter(range(10**6))

  for w in WORKLOADS.values():
    w['batch_size'] *= args.batch_scale

  def config(preset, steps, *extra):
    w = WORKLOADS[preset]
    return configs.load_train_config(['train/tiny_cpu.gin'], [
        f"model.name='{preset}'", "data.source='synthetic'", 'data.eval_every=0',
        f"train.batch_size={w['batch_size']}", f"train.seq_len={w['seq_len']}",
        f'train.steps={steps}', 'train.log_every=1', 'optimizer.warmup_steps=2', *extra])

  def run(cfg):
    workdir = os.path.join(work, f'run{next(runs)}')
    return workdir, train(cfg, workdir, progress=False)

  results = {'device': jax.devices()[0].device_kind, 'devices': jax.device_count()}
  for preset in args.presets.split(','):
    w = WORKLOADS[preset]
    log(f'== {preset}: batch {w["batch_size"]} x {w["seq_len"]} on {jax.device_count()} devices')
    # 1. Step time, just-in-time on vs off.
    times = {True: [], False: []}
    for r in range(args.runs):
      for jit in ((True, False) if r % 2 == 0 else (False, True)):
        workdir, logged = run(config(preset, w['steps'] + 2, f'checkpoint.just_in_time={jit}'))
        shutil.rmtree(workdir)  # checkpoints of bigger batches fill a disk quickly
        times[jit] += [x['step_time'] for x in logged[2:]]
        log(f'  just_in_time={jit}: median step {np.median(times[jit]) * 1e3:.1f} ms')
    on, off = float(np.median(times[True])), float(np.median(times[False]))
    step_time = {'jit_on_s': on, 'jit_off_s': off, 'ratio_on_off': on / off,
                 'steps_per_mode': len(times[True])}

    # 2. Save blocking, async vs sync.
    cfg = config(preset, 10)
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    state, _ = init_train_state(cfg, make_mesh(cfg.mesh), tx)
    jax.block_until_ready(state)
    blocking = {}
    for mode in ('first', 'async', 'sync'):
      directory = os.path.join(work, f'save-{preset}-{mode}')
      ckpts = Checkpoints(directory, CheckpointConfig(keep=2, async_save=mode != 'sync'), cfg)
      samples = []
      for i in range(1 if mode == 'first' else args.saves):
        start = time.perf_counter()
        ckpts.save(i + 1, state, None, wait=mode == 'sync')
        samples.append(time.perf_counter() - start)
        ckpts.wait()
      ckpts.close()
      shutil.rmtree(directory)
      blocking[mode] = float(np.median(samples))
      log(f'  save ({mode}): blocks {blocking[mode] * 1e3:.1f} ms')
    blocking['async_over_sync'] = blocking['async'] / blocking['sync']

    # 3. Lost work and recovery per failure.
    rng = random.Random(0)
    c = w['every']
    failures = {}
    for jit in (False, True):
      lost, recovery = [], []
      for _ in range(args.failures - (preset != 'tiny')):
        f = rng.randrange(c, 3 * c)
        cfg = config(preset, f + 2, f'checkpoint.just_in_time={jit}', f'checkpoint.every_steps={c}',
                     "fault.kind='exception'", f'fault.step={f}')
        workdir = os.path.join(work, f'run{next(runs)}')
        try:
          train(cfg, workdir, progress=False)
          raise RuntimeError('the injected failure did not happen')
        except faults.TrainingInterrupted as e:
          failed_at = e.failed_at
        except faults.FaultInjected:
          failed_at = time.time()  # without the just-in-time machinery nothing is saved
        logged = train(cfg, workdir, progress=False)
        shutil.rmtree(workdir)
        resumed = logged[0]['step'] - 1
        lost.append(f + 1 - resumed)
        recovery.append(logged[0]['time'] - failed_at)
        log(f'  just_in_time={jit}: failed in step {f}, resumed at {resumed}: '
            f'{lost[-1]} steps recomputed, recovery {recovery[-1]:.1f} s')
      failures['jit' if jit else 'periodic'] = {
          'mean_lost_steps': float(np.mean(lost)), 'max_lost_steps': int(max(lost)),
          'lost_steps': lost, 'median_recovery_s': float(np.median(recovery)),
          'lost_work_s': float(np.mean(lost)) * off}
    results[preset] = {'workload': w, 'step_time': step_time, 'save_blocking_s': blocking,
                       'failures': failures}

  print(f'\nDevice: {results["devices"]} x {results["device"]}.')
  print('| preset | batch | step, JIT on | step, JIT off | on/off | async save blocks | sync save | '
        'first save | lost/failure: periodic c | lost: JIT | recovery: periodic | recovery: JIT |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for preset in args.presets.split(','):
    r = results[preset]
    s, b, fl = r['step_time'], r['save_blocking_s'], r['failures']
    print(f"| {preset} | {r['workload']['batch_size']}x{r['workload']['seq_len']} | "
          f"{s['jit_on_s'] * 1e3:.1f} ms | {s['jit_off_s'] * 1e3:.1f} ms | "
          f"{s['ratio_on_off']:.3f} | {b['async'] * 1e3:.0f} ms | {b['sync'] * 1e3:.0f} ms | "
          f"{b['first'] * 1e3:.0f} ms | {fl['periodic']['mean_lost_steps']:.1f} steps "
          f"(c={r['workload']['every']}) | {fl['jit']['max_lost_steps']} step max | "
          f"{fl['periodic']['median_recovery_s']:.1f} s + {fl['periodic']['lost_work_s']:.1f} s "
          f"recompute | {fl['jit']['median_recovery_s']:.1f} s + {fl['jit']['lost_work_s']:.1f} s |")
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'checkpoint_overhead.json'), 'w') as f:
    json.dump(results, f, indent=2)
  shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
