"""Recovery of a 2-process job after one process is SIGKILLed: just-in-time vs periodic checkpoints.

  python benchmarks/recovery.py                      # 2 failures per mode, ~10 min on 2 CPU cores
  python benchmarks/recovery.py --failures 1 --every 4

Each run is `stoker launch --local-processes 2 --devices-per-process 4 --supervise -- train ...`
on a small prepared corpus, with process 1 SIGKILLed in a step drawn uniformly from [c, 2c)
(fault.kind='sigkill', fault.process=1). Process 0's next collective stalls; the launcher tells its
watchdog that process 1 exited (STOKER_PEER_EXITED: parallelism/launch.py), which acts within a
second, not after checkpoint.hang_timeout_s (or the all-reduce fails outright), and:
  just in time  it writes the pre-step state it holds (train/emergency.py: no collectives) and exits;
  periodic      (checkpoint.just_in_time=False, the fused step) it has nothing consistent to save
                and exits.
The supervisor restarts both processes, which resume from the emergency checkpoint or the newest
periodic one (every c steps). Per failure it reports, from the processes' logs and metrics:
  steps replayed  the killed step + 1 - the step resumed from (at least 1: the killed step itself);
  detection       SIGKILL -> the survivor notices (told by the launcher, its watchdog timing out, or
                  its step raising);
  recovery        SIGKILL -> the first step finished after the restart (detection, save, exit,
                  restart, distributed start-up, compile, restore, that step);
  caught up       SIGKILL -> the killed step finished again (recovery + the replayed steps).
Writes benchmarks/out/recovery.json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

from _common import log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ['model.num_layers=2', 'model.d_model=64', 'model.num_heads=4', 'model.num_kv_heads=2',
         'model.head_dim=16', 'model.mlp_dim=128', 'model.vocab_size=320']
STAMP = r'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})'


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--failures', type=int, default=2, help='failures per mode')
  p.add_argument('--every', type=int, default=4, help='periodic checkpoint interval c (steps)')
  p.add_argument('--hang_timeout_s', type=float, default=600.0,
                 help='checkpoint.hang_timeout_s (the default); the launcher\'s word comes first')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  return p.parse_args(argv)


def stoker(*args, timeout=900) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  return subprocess.run([sys.executable, os.path.join(REPO, 'cli.py'), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, start_new_session=True)


def prepare(root: str) -> str:
  words = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu'.split()
  rng = random.Random(0)
  os.makedirs(os.path.join(root, 'text'))
  for i in range(120):
    with open(os.path.join(root, 'text', f'd{i}.txt'), 'w') as f:
      f.write(' '.join(rng.choice(words) for _ in range(rng.randrange(20, 200))))
  out = os.path.join(root, 'prep')
  result = stoker('prepare', '--source', os.path.join(root, 'text', '*.txt'), '--out', out,
                  '--train-tokenizer', '--vocab-size', '320')
  if result.returncode:
    raise RuntimeError(result.stderr[-2000:])
  return out


def seconds(stamp: str) -> float:
  return datetime.datetime.strptime(stamp, '%Y-%m-%d %H:%M:%S,%f').timestamp()


def first(pattern: str, text: str) -> re.Match:
  match = re.search(pattern, text)
  if match is None:
    raise RuntimeError(f'no line matching {pattern!r} in the job\'s logs (job.log, stoker*.log in its workdir).')
  return match


def drill(data: str, workdir: str, jit: bool, kill_step: int, args) -> dict:
  params = [*MODEL, f"data.source='{data}'", 'data.eval_every=0', f'train.steps={kill_step + 3}',
            'train.batch_size=8', 'train.seq_len=32', 'train.log_every=1',
            f'checkpoint.every_steps={args.every}', f'checkpoint.just_in_time={jit}',
            f'checkpoint.hang_timeout_s={args.hang_timeout_s}', "fault.kind='sigkill'",
            'fault.process=1', f'fault.step={kill_step}']
  command = ['launch', '--local-processes', '2', '--devices-per-process', '4', '--supervise',
             '--max_restarts', '1', '--', 'train', '--gin_file', 'train/tiny_cpu.gin',
             '--workdir', workdir]
  for p in params:
    command += ['--gin_param', p]
  result = stoker(*command)
  text = result.stderr
  with open(os.path.join(workdir, 'job.log'), 'w') as f:
    f.write(text)
  if result.returncode:
    raise RuntimeError(f'the job failed ({result.returncode}); its log: {workdir}/job.log')
  # Timestamps to the millisecond are in the processes' own log files (the console shows the time of day).
  logs = ''.join(open(f, encoding='utf-8').read()
                 for f in sorted(glob.glob(os.path.join(workdir, 'stoker*.log'))))
  killed = seconds(first(STAMP + r' WARNING [^\]]*\] injected fault: SIGKILL in step', logs).group(1))
  # The survivor's watchdog (told by the launcher, or timing out), or (fused step) the failed
  # gradient all-reduce raising.
  noticed = seconds(first(STAMP + r' ERROR [^\]]*\] (Process \d+ of this job exited|No training progress|'
                          r'Step failed in a multi-process)', logs).group(1))
  resumed = int(first(r'Resumed from the (?:emergency )?checkpoint of step (\d+)', text).group(1))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  after = [r for r in records if 'loss' in r and r['time'] > killed]  # steps finished after it
  done = min(r['time'] for r in after if r['step'] == resumed + 1)
  caught_up = min(r['time'] for r in after if r['step'] == kill_step + 1)
  return {'kill_step': kill_step, 'resumed_from': resumed, 'replayed': kill_step + 1 - resumed,
          'detection_s': noticed - killed, 'recovery_s': done - killed,
          'caught_up_s': caught_up - killed}


def main(argv=None) -> int:
  args = parse_args(argv)
  work = tempfile.mkdtemp(prefix='stoker-recovery-bench-')
  data = prepare(work)
  rng = random.Random(args.seed)
  results = {'every': args.every, 'hang_timeout_s': args.hang_timeout_s, 'runs': []}
  for i in range(args.failures):
    kill_step = rng.randrange(args.every, 2 * args.every)
    for jit in (True, False):
      run = drill(data, os.path.join(work, f'run{i}-{jit}'), jit, kill_step, args)
      run['mode'] = 'just_in_time' if jit else 'periodic'
      results['runs'].append(run)
      log(f"  {run['mode']}: killed in step {kill_step}, resumed from {run['resumed_from']}: "
          f"{run['replayed']} steps replayed, detected after {run['detection_s']:.1f} s, training "
          f"again after {run['recovery_s']:.1f} s, caught up after {run['caught_up_s']:.1f} s")
  print(f'\n2 processes x 4 CPU devices; periodic checkpoints every c = {args.every} steps; '
        f'watchdog timeout {args.hang_timeout_s:.0f} s; {args.failures} failures per mode.')
  print('| mode | steps replayed (each failure) | detection | failure -> training again | '
        'failure -> killed step done again |')
  print('|---|---|---|---|---|')
  for mode in ('just_in_time', 'periodic'):
    runs = [r for r in results['runs'] if r['mode'] == mode]
    print(f"| {mode} | {', '.join(str(r['replayed']) for r in runs)} | "
          f"{statistics.median(r['detection_s'] for r in runs):.1f} s | "
          f"{statistics.median(r['recovery_s'] for r in runs):.1f} s | "
          f"{statistics.median(r['caught_up_s'] for r in runs):.1f} s |")
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'recovery.json'), 'w') as f:
    json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
