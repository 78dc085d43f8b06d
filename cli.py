"""The `stoker` command: parses flags and gin files, then calls one library function per subcommand.

Each subcommand is its flags (a `_<name>_flags(parser)`, or a library's `add_arguments`) and a
`_<name>(args, argv)` that calls its library; COMMANDS lists them. Libraries are imported inside the
functions: JAX must start after XLA_FLAGS is set, and commands that need no JAX start fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time

QUICKSTART_GIN = 'train/tiny_cpu.gin'
SERVE_LOG = os.path.join('~', '.cache', 'stoker', 'logs', 'serve.log')
# pylint: disable=g-import-not-at-top


def _use_host_devices(n: int) -> None:
  """Splits the CPU into `n` devices (must happen before JAX starts); other platforms ignore it."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()


def _gin_flags(parser, what: str, example: str) -> None:
  parser.add_argument('--gin_file', action='append', default=[],
                      help=f'A gin file (path, or relative to configs/) binding {what}; repeatable.')
  parser.add_argument('--gin_param', action='append', default=[],
                      help=f"A gin binding such as '{example}'; repeatable, applied last.")


def _train_flags(p) -> None:
  _gin_flags(p, 'the training recipe', 'train.steps=30')
  p.add_argument('--workdir', required=True, help='Where checkpoints, metrics and TensorBoard files go; a '
                 'workdir with checkpoints is resumed.')
  p.add_argument('--supervise', action='store_true',
                 help='Restart training after a just-in-time checkpoint exit (preemption, a failed or hung '
                      'step) or a kill, up to --max_restarts times.')
  p.add_argument('--max_restarts', type=int, default=3)


def _train(args, argv) -> int:
  if args.supervise:
    from train.supervise import supervise_train
    return supervise_train(argv, args.max_restarts)
  return _run_training(args.gin_file or [QUICKSTART_GIN], args.gin_param, args.workdir)


def _run_training(gin_files, gin_params, workdir) -> int:
  import gin
  import configs
  from train.command import train_command
  return train_command(configs.load_train_config(gin_files, gin_params), workdir, gin.config_str())


def _launch(args, argv) -> int:
  from train.supervise import launch
  return launch(args.command_args, args.local_processes, args.devices_per_process, args.grace_s,
                args.supervise, args.max_restarts)


def _quickstart_flags(p) -> None:
  p.add_argument('--workdir', default=os.path.join('runs', time.strftime('quickstart-%Y%m%d-%H%M%S')),
                 help='Default: runs/quickstart-<timestamp> in the current directory.')
  p.add_argument('--gin_param', action='append', default=[])
  p.add_argument('--no_serve', action='store_true', help='Only train.')


def _quickstart(args, argv) -> int:
  code = _run_training([QUICKSTART_GIN], args.gin_param, args.workdir)
  if code or args.no_serve:
    return code
  from serve import demo
  demo.serve_and_sample(args.workdir)
  return 0


def _serve_flags(p) -> None:
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument('--checkpoint', help='A training workdir (its newest checkpoint), its checkpoints/ '
                      'folder, or one step folder.')
  source.add_argument('--hf-dir', '--hf_dir', dest='hf_dir',
                      help='A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).')
  p.add_argument('--step', type=int, default=None, help='Checkpoint step (default: the newest).')
  p.add_argument('--tokenizer', default=None,
                 help="A tokenizer.json or its directory (default: the training data's, or --hf-dir's).")
  _gin_flags(p, 'engine.* (EngineConfig) and server.* (ServerConfig)', 'engine.num_pages=512')
  p.add_argument('--host', default=None, help='Address to bind (default 127.0.0.1: this machine only).')
  p.add_argument('--port', type=int, default=None, help='Default 8000; 0 picks a free port.')
  p.add_argument('--api-key', '--api_key', dest='api_key', default=os.environ.get('STOKER_API_KEY'),
                 help='Require "Authorization: Bearer KEY" (probes, /metrics: open; default: $STOKER_API_KEY).')
  p.add_argument('--served-model-name', '--served_model_name', dest='served_model_name', default=None,
                 help='The model name clients send (default: the workdir name).')
  p.add_argument('--tensor_parallel', type=int, default=1, help='Shard the model over N devices (heads, MLP, vocab).')
  p.add_argument('--log-file', '--log_file', dest='log_file', default=SERVE_LOG,
                 help=f"Libraries' detailed logs (appended; default {SERVE_LOG}).")
  importlib.import_module('serve.lora_flags').add_arguments(p)
  importlib.import_module('serve.spec_flags').add_arguments(p)


def _serve(args, argv) -> int:
  import configs
  from serve.command import lora_flags, serve_command
  from serve import spec_flags
  engine_cfg, server_cfg = configs.load_serve_config(args.gin_file, args.gin_param)
  given = {k: v for k, v in (('host', args.host), ('port', args.port), ('api_key', args.api_key),
                             ('model_name', args.served_model_name)) if v is not None}
  return serve_command(engine_cfg, dataclasses.replace(server_cfg, **given), checkpoint=args.checkpoint,
                       hf_dir=args.hf_dir, step=args.step, tokenizer=args.tokenizer,
                       tensor_parallel=args.tensor_parallel, **lora_flags.values(args),
                       **spec_flags.values(args))


def _prepare(args, argv) -> int:
  from data import prepare
  return prepare.prepare_command(vars(args), args.out, argv)


def _convert(args, argv) -> int:
  if sum(map(bool, (args.from_hf, args.to_hf, args.to_peft, args.from_peft))) != 1:
    raise ValueError('give exactly one of --from-hf DIR, --to-hf CHECKPOINT, --to-peft CHECKPOINT or '
                     '--from-peft DIR --base MODEL.')
  if args.to_hf or args.to_peft:
    from models import checkpoint_io
    written = checkpoint_io.to_hf(args.to_hf, args.out, step=args.step, dtype=args.dtype,
                                  tokenizer_dir=args.tokenizer, merge_lora=args.merge_lora,
                                  max_shard_bytes=int(args.max_shard_mb * 2**20)
                                  ) if args.to_hf else checkpoint_io.to_peft(args.to_peft, args.out, step=args.step)
    print(f'Wrote {args.out}: {", ".join(written)}')
    return 0
  import configs
  from train import from_hf
  files = [configs.resolve(f) for f in args.gin_file or [QUICKSTART_GIN]]
  params = ([] if args.gin_file else ["data.source = 'synthetic'", 'data.eval_every = 0']) + args.gin_param
  if args.from_peft:
    return from_hf.from_peft_command(args.from_peft, args.base, args.out, configs.load_train_config(files, params),
                                     files, params)
  return from_hf.from_hf_command(args.from_hf, args.out, configs.load_train_config(files, params), files, params)


def _profile(args, argv) -> int:
  import gin
  import configs
  from serve.sim import profile
  engine_cfg, _ = configs.load_serve_config(args.gin_file, args.gin_param)
  try:
    gin.query_parameter('model.name')
    model_cfg = configs.model(args.model) if args.model else configs.model()
  except ValueError:  # no model.name bound: --model, else the tiny preset
    model_cfg = configs.model(args.model or 'tiny')
  return profile.profile_command(model_cfg, engine_cfg, args.out, quick=args.quick,
                                 tensor_parallel=args.tensor_parallel)


def _plan(args, argv) -> int:
  from serve.sim import plan_report, slo
  objective = slo.parse(args.slo)  # before anything slow: a typo fails at once
  if args.model.endswith('.gin') or os.path.isfile(args.model):
    import configs
    model = configs.load_train_config([args.model]).model
  else:
    from models.presets import preset
    model = preset(args.model)
  return plan_report.plan_command(model, objective, args)


# name: (help, flags, run). `flags` declares the subcommand's flags: a function, or the module whose
# add_arguments(parser) does (imported only when that subcommand runs). deploy/command.py declares `k8s`.
COMMANDS = {
    'train': ('Train a model described by gin files.', _train_flags, _train),
    'launch': ('Run a stoker command as a multi-process job on this machine.', 'parallelism.launch', _launch),
    'quickstart': (f'Train the tiny preset ({QUICKSTART_GIN}), then serve it and print completions '
                   'fetched through the OpenAI API.', _quickstart_flags, _quickstart),
    'serve': ('Serve a checkpoint or a Hugging Face model over an OpenAI-compatible HTTP API '
              '(/v1/completions, /v1/chat/completions).', _serve_flags, _serve),
    'prepare': ('Clean and tokenize a corpus into Parquet token shards + manifest.json.', 'data.prepare',
                _prepare),
    'convert': ('Hugging Face <-> Stoker: --from-hf DIR --out WORKDIR writes a step-0 training checkpoint '
                '(fine-tune or serve it); --to-hf CKPT --out DIR writes config.json + safetensors + tokenizer '
                'files.', 'train.from_hf', _convert),
    'profile': ('Time the engine step on this backend over a grid of batch shapes (decodes, prefill chunks, '
                'mixed) for the simulator: steps.csv, host.csv, meta.json; prints the fitted step-time model '
                'and its cross-validated error.', 'serve.sim.profile', _profile),
    'bench': ('Load an OpenAI-compatible server: TTFT, TBT, fluidity-index, plots, capacity search.',
              'serve.bench.flags', lambda args, argv: importlib.import_module('serve.bench.flags').main(args)),
    'k8s': (None, None, lambda args, argv: importlib.import_module('deploy.command').run(args)),
    'plan': ('Find the cheapest serving configuration meeting a latency SLO by simulation (device, tensor '
             'parallelism, batch cap, chunk, replicas).', 'serve.sim.plan_report', _plan),
    'prune': ('Prune a checkpoint by activation importance into a smaller step-0 workdir.', 'train.compress',
              lambda args, argv: importlib.import_module('train.compress').command(args, argv)),
    'distill': ('Train a student workdir by distillation from a teacher.', 'train.distill',
                lambda args, argv: importlib.import_module('train.distill').command(args, _run_training)),
    'rl': ('GRPO with the serving engine in the loop: sample, score with rewards, step, swap weights.',
           'rl.command', lambda args, argv: importlib.import_module('rl.command').command(args, argv)),
}


def parser(command: str | None = None) -> argparse.ArgumentParser:
  """The `stoker` parser, with the flags of `command` only: a subcommand's flags may live beside
  its library, which need not be imported to run another subcommand."""
  p = argparse.ArgumentParser(prog='stoker', description=__doc__.split('\n')[0])
  p.add_argument('--host_devices', type=int, default=None,
                 help='CPU devices to emulate when running on CPU (default 8; serve and profile: '
                      '--tensor_parallel up to 8, as devices a step does not use slow it down).')
  sub = p.add_subparsers(dest='command', required=True)
  for name, (help_text, add_flags, _) in COMMANDS.items():
    if name == 'k8s':
      from deploy import command as k8s  # argparse only
      k8s.add_parser(sub)
    elif name == command:
      flags = sub.add_parser(name, help=help_text)
      (importlib.import_module(add_flags).add_arguments if isinstance(add_flags, str) else add_flags)(flags)
      flags.add_argument('--verbose', action='store_true',
                         help="Libraries' INFO logs on the console too (else only in the log file).")
    else:
      sub.add_parser(name, help=help_text)
  return p


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parser(next((a for a in argv if a in COMMANDS), None)).parse_args(argv)
  from parallelism import distributed, logs  # no JAX
  workdir = {'train': 'workdir', 'quickstart': 'workdir', 'distill': 'student', 'rl': 'workdir'}.get(
      args.command)  # log there
  log_file = logs.process_log_file(getattr(args, workdir)) if workdir else getattr(args, 'log_file', None)
  logs.setup(log_file and os.path.expanduser(log_file), getattr(args, 'verbose', False))
  if args.host_devices is None:  # a step on one of 8 host devices took 30 ms where it took 23 ms on 1 of 1
    args.host_devices = min(getattr(args, 'tensor_parallel', 8), 8)
  _use_host_devices(args.host_devices)
  try:
    code = COMMANDS[args.command][2](args, argv)
    distributed.finish(code)  # a multi-process job's process ends here on success
    return code
  except (ValueError, FileNotFoundError) as e:
    print(f'stoker {args.command}: error: {e}', file=sys.stderr)
    return 2
  finally:
    logs.close()  # for callers in this process (tests, notebooks)


if __name__ == '__main__':
  sys.exit(main())
