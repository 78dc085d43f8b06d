"""The `stoker` command: parses flags and gin files, then calls one library function per subcommand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

QUICKSTART_GIN = 'train/tiny_cpu.gin'


def _use_host_devices(n: int) -> None:
  """Splits the CPU into `n` devices (must happen before JAX starts); other platforms ignore it."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()


def _train(gin_files, gin_params, workdir) -> int:
  import configs  # pylint: disable=g-import-not-at-top  (JAX must start after XLA_FLAGS is set)
  from train import loop  # pylint: disable=g-import-not-at-top
  cfg = configs.load_train_config(gin_files, gin_params)
  logged = loop.train(cfg, workdir)
  first, last = logged[0]['loss'], logged[-1]['loss']
  print(f'Trained {cfg.steps} steps: loss {first:.4f} -> {last:.4f}. '
        f'Metrics: {os.path.join(workdir, "metrics.jsonl")}; '
        f'TensorBoard: tensorboard --logdir {os.path.join(workdir, "tensorboard")}')
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='stoker', description=__doc__)
  parser.add_argument('--host_devices', type=int, default=8,
                      help='CPU devices to emulate when running on CPU (default 8).')
  sub = parser.add_subparsers(dest='command', required=True)

  train = sub.add_parser('train', help='Train a model described by gin files.')
  train.add_argument('--gin_file', action='append', default=[],
                     help='A gin file (path, or relative to configs/); repeatable.')
  train.add_argument('--gin_param', action='append', default=[],
                     help="A gin binding such as 'train.steps=30'; repeatable, applied last.")
  train.add_argument('--workdir', required=True, help='Where metrics and TensorBoard files go.')

  quick = sub.add_parser('quickstart', help=f'Train the tiny preset ({QUICKSTART_GIN}).')
  quick.add_argument('--workdir', default=None,
                     help='Default: runs/quickstart-<timestamp> in the current directory.')
  quick.add_argument('--gin_param', action='append', default=[])

  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  _use_host_devices(args.host_devices)
  try:
    if args.command == 'train':
      return _train(args.gin_file or [QUICKSTART_GIN], args.gin_param, args.workdir)
    workdir = args.workdir or os.path.join('runs', time.strftime('quickstart-%Y%m%d-%H%M%S'))
    return _train([QUICKSTART_GIN], args.gin_param, workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f'stoker {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
