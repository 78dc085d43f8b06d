"""The `stoker` command: parses flags and gin files, then calls one library function per subcommand."""

from __future__ import annotations

import argparse
import dataclasses
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
  import gin  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top  (JAX must start after XLA_FLAGS is set)
  from train import faults, loop  # pylint: disable=g-import-not-at-top
  from parallelism import distributed  # pylint: disable=g-import-not-at-top
  cfg = configs.load_train_config(gin_files, gin_params)
  # Before anything touches a device. The coordination service ends every process some time after
  # one dies; give the survivors' watchdog time to notice the stall (even in a save) and save first.
  # (It ended them 55-90 s after a death with the default 100 s.)
  watchdog_limit = max(60, faults.PAUSED_SLACK * cfg.checkpoint.hang_timeout_s)
  distributed.initialize(distributed.from_env(), heartbeat_timeout_s=int(2 * watchdog_limit + 60))
  _use_compilation_cache()
  try:
    logged = loop.train(cfg, workdir, config_text=gin.config_str())
  except faults.TrainingInterrupted as e:
    print(f'stoker train: {e} Exit code {e.exit_code}; run the same command again to resume.',
          file=sys.stderr)
    return e.exit_code
  except Exception:  # pylint: disable=broad-except
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      raise
    # A collective that failed usually means a peer died; JAX's shutdown barrier would wait for it
    # until the heartbeat timeout. The supervisor restarts from the newest checkpoint.
    logging.exception('Step failed in a multi-process job; exiting at once.')
    logging.shutdown()
    os._exit(faults.EXIT_STEP_FAILED)  # pylint: disable=protected-access
  losses = [r['loss'] for r in logged if 'loss' in r]
  if not losses:
    print(f'Nothing to train: {workdir} already holds the checkpoint of step {cfg.steps}.')
    return 0
  validation = [r['val_perplexity'] for r in logged if 'val_perplexity' in r]
  summary = f', validation perplexity {validation[-1]:.2f}' if validation else ''
  print(f'Trained {cfg.steps} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}{summary}. '
        f'Metrics: {os.path.join(workdir, "metrics.jsonl")}; '
        f'TensorBoard: tensorboard --logdir {os.path.join(workdir, "tensorboard")}')
  return 0


def _use_compilation_cache() -> None:
  """JAX's persistent compilation cache (as MaxText does): a restarted run skips compilation.
  JAX_COMPILATION_CACHE_DIR overrides the place."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    # A CPU executable's gloo collectives belong to the process that compiled it: a process that
    # loads another's from the cache waits in collectives its peers never join.
    jax.config.update('jax_enable_compilation_cache', False)
    return
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(os.path.join('~', '.cache', 'stoker', 'xla')))


def _launch(args) -> int:
  from parallelism.launch import run_local  # pylint: disable=g-import-not-at-top
  command = args.command_args[1:] if args.command_args[:1] == ['--'] else args.command_args
  if command[:1] == ['stoker']:
    command = command[1:]
  if not command:
    raise ValueError('stoker launch needs the command to run after --, e.g. '
                     '`stoker launch --local-processes 2 -- train --gin_file ... --workdir ...`.')

  def run(on_signal):
    return run_local(command, args.local_processes, args.devices_per_process, args.grace_s,
                     on_signal)

  if not args.supervise:
    return run(lambda: None)
  from train.supervise import supervise  # pylint: disable=g-import-not-at-top
  return supervise(run, args.max_restarts)


def _without_supervision(argv: list[str]) -> list[str]:
  """The command line without --supervise and --max_restarts: what the supervised child runs."""
  child, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == '--max_restarts':
      skip = True
    elif a != '--supervise' and not a.startswith('--max_restarts='):
      child.append(a)
  return child


def _prepare(args, argv) -> int:
  from data import prepare  # pylint: disable=g-import-not-at-top  (no JAX needed: keep start-up fast)
  fields = {f.name for f in dataclasses.fields(prepare.PrepareConfig)}
  cfg = prepare.PrepareConfig(**{k: v for k, v in vars(args).items() if k in fields})
  manifest = prepare.prepare(cfg, args.out, argv)
  train, val = manifest['splits']['train'], manifest['splits']['validation']
  print(f'Prepared {args.out}: {manifest["documents"]["kept"]} documents '
        f'(train {train["documents"]}, validation {val["documents"]}), '
        f'{train["tokens"] + val["tokens"]} tokens in {len(train["shards"]) + len(val["shards"])} shards, '
        f'vocabulary {manifest["tokenizer"]["vocab_size"]}. Manifest: {os.path.join(args.out, "manifest.json")}')
  return 0


def _serve(args) -> int:
  import configs  # pylint: disable=g-import-not-at-top  (JAX must start after XLA_FLAGS is set)
  from serve import loader, server  # pylint: disable=g-import-not-at-top
  engine_cfg, server_cfg = configs.load_serve_config(args.gin_file, args.gin_param)
  given = {k: v for k, v in (('host', args.host), ('port', args.port), ('api_key', args.api_key),
                             ('model_name', args.served_model_name)) if v is not None}
  server_cfg = dataclasses.replace(server_cfg, **given)
  if engine_cfg.compilation_cache_dir is None:
    _use_compilation_cache()
  mesh = loader.serving_mesh(args.tensor_parallel)
  loader.check_source(args.checkpoint, args.hf_dir, args.step)  # fails before a port is bound
  if args.checkpoint:
    load = lambda: loader.load_checkpoint(args.checkpoint, engine_cfg, step=args.step, mesh=mesh,
                                          tokenizer=args.tokenizer)
  else:
    load = lambda: loader.load_hf(args.hf_dir, engine_cfg, mesh=mesh, tokenizer=args.tokenizer)
  return server.serve(server.Service(server_cfg, load))


def _quickstart(args) -> int:
  workdir = args.workdir or os.path.join('runs', time.strftime('quickstart-%Y%m%d-%H%M%S'))
  code = _train([QUICKSTART_GIN], args.gin_param, workdir)
  if code or args.no_serve:
    return code
  from serve import demo  # pylint: disable=g-import-not-at-top
  demo.serve_and_sample(workdir)
  return 0


def _profile(args) -> int:
  import gin  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top  (JAX must start after XLA_FLAGS is set)
  from serve import loader  # pylint: disable=g-import-not-at-top
  from serve.sim import estimator, profile  # pylint: disable=g-import-not-at-top
  engine_cfg, _ = configs.load_serve_config(args.gin_file, args.gin_param)
  try:
    gin.query_parameter('model.name')
    model_cfg = configs.model(args.model) if args.model else configs.model()
  except ValueError:  # no model.name bound: --model, else the tiny preset
    model_cfg = configs.model(args.model or 'tiny')
  if engine_cfg.compilation_cache_dir is None:
    _use_compilation_cache()
  meta = profile.profile(model_cfg, engine_cfg, args.out, quick=args.quick,
                         mesh=loader.serving_mesh(args.tensor_parallel))
  fitted = estimator.fit(estimator.load_profile(args.out))
  print(f'Profiled {meta["num_params"]:,} parameters on {meta["device_kind"]} ({meta["backend"]}, '
        f'tensor parallel {meta["tensor_parallel"]}): {meta["steps_rows"]} step shapes in '
        f'{meta["duration_s"]:.0f} s, load average {meta["loadavg_before"][0]} -> '
        f'{meta["loadavg_after"][0]}. Wrote {args.out}/steps.csv, host.csv, meta.json.\n'
        f'Fitted: {fitted.describe()}.')
  return 0


def _convert(args) -> int:
  if bool(args.from_hf) == bool(args.to_hf):
    raise ValueError('give exactly one of --from-hf DIR or --to-hf CHECKPOINT.')
  if args.to_hf:
    from models import checkpoint_io  # pylint: disable=g-import-not-at-top
    written = checkpoint_io.to_hf(args.to_hf, args.out, step=args.step, dtype=args.dtype,
                                  tokenizer_dir=args.tokenizer,
                                  max_shard_bytes=int(args.max_shard_mb * 2**20))
    print(f'Wrote {args.out}: {", ".join(written)}')
    return 0
  import configs  # pylint: disable=g-import-not-at-top  (JAX must start after XLA_FLAGS is set)
  from train import from_hf  # pylint: disable=g-import-not-at-top
  files = [configs.resolve(f) for f in args.gin_file or [QUICKSTART_GIN]]
  params = ([] if args.gin_file else ["data.source = 'synthetic'", 'data.eval_every = 0'])
  params += args.gin_param
  cfg = from_hf.from_hf(args.from_hf, args.out, configs.load_train_config(files, params), files,
                        params)
  print(f'Converted {args.from_hf} ({cfg.model.num_params():,} parameters) into {args.out} '
        f'(step 0). Fine-tune: stoker train --gin_file {os.path.join(args.out, "train.gin")} '
        f'--workdir {args.out}; export: stoker convert --to-hf {args.out} --out DIR')
  return 0


def _plan(args) -> int:
  from serve.bench.workload import WorkloadConfig  # pylint: disable=g-import-not-at-top
  from serve.sim import plan, plan_report, plan_space, slo  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  objective = slo.parse(args.slo)  # before anything slow: a typo fails at once
  if args.model.endswith('.gin') or os.path.isfile(args.model):
    import configs  # pylint: disable=g-import-not-at-top
    model = configs.load_train_config([args.model]).model
  else:
    from models.presets import preset  # pylint: disable=g-import-not-at-top
    model = preset(args.model)

  def ints(text, flag):
    try:
      return tuple(int(x) for x in text.split(',') if x.strip())
    except ValueError:
      raise ValueError(f'{flag} {text!r}: give comma-separated integers.') from None

  cfg = plan.PlanConfig(WorkloadConfig.parse(args.workload), objective, args.target_qps,
                        ints(args.max_seqs, '--max-seqs'), ints(args.token_budgets, '--token-budgets'),
                        tolerance=args.tolerance, router=args.router, prune=not args.exhaustive)
  names = [d.strip() for d in args.devices.split(',') if d.strip() not in ('', 'none')]
  hardware = plan_space.roofline_hardware(model, names)
  if args.profile:
    hardware.append(plan_space.profiled_hardware(model, args.profile, args.profile_price))
  if not hardware:
    raise ValueError('stoker plan: nothing to plan on; name --devices and/or a --profile DIR.')
  result = plan.plan(hardware, cfg)
  paths = plan_report.write(args.out, result, plots=not args.no_plots)
  print(plan_report.table(result))
  print(plan_report.verdict(result))
  print(f'{result["simulations"]} simulations in {time.perf_counter() - start:.1f} s; wrote {", ".join(paths)}')
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog='stoker', description=__doc__)
  parser.add_argument('--host_devices', type=int, default=None,
                      help='CPU devices to emulate when running on CPU (default 8; serve and profile: '
                           '--tensor_parallel up to 8, as devices a step does not use slow it down).')
  sub = parser.add_subparsers(dest='command', required=True)

  train = sub.add_parser('train', help='Train a model described by gin files.')
  train.add_argument('--gin_file', action='append', default=[],
                     help='A gin file (path, or relative to configs/); repeatable.')
  train.add_argument('--gin_param', action='append', default=[],
                     help="A gin binding such as 'train.steps=30'; repeatable, applied last.")
  train.add_argument('--workdir', required=True,
                     help='Where checkpoints, metrics and TensorBoard files go; a workdir with '
                          'checkpoints is resumed.')
  train.add_argument('--supervise', action='store_true',
                     help='Restart training after a just-in-time checkpoint exit (preemption, a '
                          'failed or hung step) or a kill, up to --max_restarts times.')
  train.add_argument('--max_restarts', type=int, default=3)

  launch = sub.add_parser('launch', help='Run a stoker command as a multi-process job on this machine.')
  launch.add_argument('--local-processes', dest='local_processes', type=int, default=2)
  launch.add_argument('--devices-per-process', dest='devices_per_process', type=int, default=4,
                      help='Fake CPU devices of each process (default 4).')
  launch.add_argument('--grace_s', type=float, default=180.0,
                      help='After one process fails, how long the others may take to save and exit '
                           '(more than their watchdog needs to notice: checkpoint.hang_timeout_s, '
                           'max(60 s, 4x that) inside a save).')
  launch.add_argument('--supervise', action='store_true',
                      help='Restart the whole job after a just-in-time exit or a kill.')
  launch.add_argument('--max_restarts', type=int, default=3)
  launch.add_argument('command_args', nargs=argparse.REMAINDER,
                      help='-- then the stoker command, e.g. -- train --gin_file ... --workdir ...')

  quick = sub.add_parser('quickstart', help=f'Train the tiny preset ({QUICKSTART_GIN}), then serve it '
                         'and print completions fetched through the OpenAI API.')
  quick.add_argument('--workdir', default=None,
                     help='Default: runs/quickstart-<timestamp> in the current directory.')
  quick.add_argument('--gin_param', action='append', default=[])
  quick.add_argument('--no_serve', action='store_true', help='Only train.')

  serve = sub.add_parser('serve', help='Serve a checkpoint or a Hugging Face model over an '
                         'OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).')
  source = serve.add_mutually_exclusive_group(required=True)
  source.add_argument('--checkpoint', help='A training workdir (its newest checkpoint), its '
                      'checkpoints/ folder, or one step folder.')
  source.add_argument('--hf-dir', '--hf_dir', dest='hf_dir',
                      help='A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).')
  serve.add_argument('--step', type=int, default=None, help='Checkpoint step (default: the newest).')
  serve.add_argument('--tokenizer', default=None,
                     help="A tokenizer.json or its directory (default: the training data's, or --hf-dir's).")
  serve.add_argument('--gin_file', action='append', default=[],
                     help='A gin file binding engine.* (EngineConfig) and server.* (ServerConfig).')
  serve.add_argument('--gin_param', action='append', default=[],
                     help="A binding such as 'engine.num_pages=512'; repeatable, applied last.")
  serve.add_argument('--host', default=None, help='Address to bind (default 127.0.0.1: this machine only).')
  serve.add_argument('--port', type=int, default=None, help='Default 8000; 0 picks a free port.')
  serve.add_argument('--api-key', '--api_key', dest='api_key', default=os.environ.get('STOKER_API_KEY'),
                     help='Require "Authorization: Bearer KEY" on /v1 routes (default: $STOKER_API_KEY).')
  serve.add_argument('--served-model-name', '--served_model_name', dest='served_model_name',
                     default=None, help='The model name clients send (default: the workdir name).')
  serve.add_argument('--tensor_parallel', type=int, default=1,
                     help='Shard the model over this many devices (heads, MLP, vocabulary).')

  prep = sub.add_parser('prepare', help='Clean and tokenize a corpus into Parquet token shards + manifest.json.')
  prep.add_argument('--source', default='stdlib',
                    help="'stdlib' (the running Python's standard library *.py files; default), or a file, "
                         'directory or glob of .txt/.md/.jsonl/.csv/.parquet files.')
  prep.add_argument('--format', default='auto', choices=['auto', 'text', 'jsonl', 'csv', 'parquet'],
                    help='Input format (default: from each file extension).')
  prep.add_argument('--field', '--column', dest='field', default='text',
                    help='The JSONL field or CSV/Parquet column holding the text (default text).')
  prep.add_argument('--limit-files', type=int, default=None, help='Read only the first N files (in order).')
  prep.add_argument('--out', required=True, help='Output directory (written whole, or not at all).')
  prep.add_argument('--overwrite', action='store_true', help='Replace an earlier output in --out.')
  prep.add_argument('--tokenizer', default=None, help='A Hugging Face tokenizer.json (or its directory) to use.')
  prep.add_argument('--train-tokenizer', action='store_true',
                    help='Train a byte-level BPE on the train split instead, saved as <out>/tokenizer.json.')
  prep.add_argument('--vocab-size', type=int, default=4096, help='Vocabulary of the trained BPE (default 4096).')
  prep.add_argument('--max-vocab', type=int, default=None,
                    help="Fail if the tokenizer's vocabulary exceeds this (the model's vocab_size).")
  prep.add_argument('--eos-token', default=None,
                    help='End-of-text token appended to each document (default: <|endoftext|>, </s>, ...).')
  prep.add_argument('--min-chars', type=int, default=1, help='Drop documents shorter than this (default 1).')
  prep.add_argument('--max-chars', type=int, default=None, help='Drop documents longer than this.')
  prep.add_argument('--validation-fraction', type=float, default=0.05, help='Share of documents (default 0.05).')
  prep.add_argument('--seed', type=int, default=0, help='Seed of the train/validation split (default 0).')
  prep.add_argument('--shard-max-tokens', type=int, default=2**20, help='Tokens per shard at most (default 2^20).')
  prep.add_argument('--row-group-size', type=int, default=256, help='Parquet rows per row group (default 256).')
  prep.add_argument('--output-format', default='parquet', choices=['parquet', 'arrayrecord'])

  conv = sub.add_parser('convert', help='Hugging Face <-> Stoker: --from-hf DIR --out WORKDIR writes a '
                        'step-0 training checkpoint (fine-tune or serve it); --to-hf CKPT --out DIR '
                        'writes config.json + safetensors + tokenizer files.')
  conv.add_argument('--from-hf', '--from_hf', dest='from_hf', default=None,
                    help='A Hugging Face model directory (config.json, *.safetensors; Llama, Mistral, '
                         'Qwen2, Qwen3).')
  conv.add_argument('--to-hf', '--to_hf', dest='to_hf', default=None,
                    help='A training workdir (its newest checkpoint), its checkpoints/ or a step folder.')
  conv.add_argument('--out', required=True, help='The workdir (--from-hf) or directory (--to-hf) to write.')
  conv.add_argument('--gin_file', action='append', default=[],
                    help='--from-hf: the training recipe to fine-tune with (default: '
                         f'{QUICKSTART_GIN} on synthetic data); its model fields other than the '
                         'architecture (dtypes, remat, scan) apply.')
  conv.add_argument('--gin_param', action='append', default=[], help='--from-hf: recipe bindings.')
  conv.add_argument('--step', type=int, default=None, help='--to-hf: the step (default: the newest).')
  conv.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                    help="--to-hf: tensor dtype (default: the original config's, else float32).")
  conv.add_argument('--tokenizer', default=None,
                    help='--to-hf: a directory whose tokenizer/chat-template files to include '
                         '(default: WORKDIR/hf, kept by --from-hf).')
  conv.add_argument('--max_shard_mb', type=float, default=5120,
                    help='--to-hf: largest safetensors file before sharding with an index (MiB).')

  prof = sub.add_parser('profile', help='Time the engine step on this backend over a grid of batch '
                        'shapes (decodes, prefill chunks, mixed) for the simulator: steps.csv, host.csv, '
                        'meta.json; prints the fitted step-time model and its cross-validated error.')
  prof.add_argument('--out', required=True, help='Directory to write (created; files replaced).')
  prof.add_argument('--model', default=None,
                    help="A model preset (models/presets.py; default: a gin file's model.name, else tiny).")
  prof.add_argument('--gin_file', action='append', default=[],
                    help='A gin file binding engine.* (EngineConfig, as for stoker serve) and model.*.')
  prof.add_argument('--gin_param', action='append', default=[],
                    help="A binding such as 'engine.token_budget=512'; repeatable, applied last.")
  prof.add_argument('--tensor_parallel', type=int, default=1,
                    help='Shard the model over this many devices, as stoker serve does.')
  prof.add_argument('--quick', action='store_true', help='A handful of shapes (seconds on CPU; for tests).')

  from serve.bench import flags as bench_flags  # pylint: disable=g-import-not-at-top  (argparse only)
  bench_flags.add_arguments(sub.add_parser(
      'bench', help='Load an OpenAI-compatible server: TTFT, TBT, fluidity-index, plots, capacity search.'))

  from deploy import command as k8s  # pylint: disable=g-import-not-at-top  (argparse only)
  k8s.add_parser(sub)

  plan = sub.add_parser('plan', help='Find the cheapest serving configuration meeting a latency SLO by '
                        'simulation (device, tensor parallelism, batch cap, chunk, replicas).')
  plan.add_argument('--model', required=True, help='A model gin file (configs/model/*.gin) or a preset name.')
  plan.add_argument('--workload', default='requests=64,prompt=uniform:128:1024,output=uniform:32:256',
                    help='key=value,... as `stoker bench --workload` (the rate is what the search varies).')
  plan.add_argument('--slo', required=True, help="e.g. 'ttft_p90<2s,tbt_p99<200ms' (ttft, tbt, tpot, e2e).")
  plan.add_argument('--target-qps', type=float, default=None, help='Requests/s to serve: replicas and cost.')
  plan.add_argument('--devices', default='all',
                    help="Roofline devices to consider, comma-separated (serve/sim/devices.py); 'all' (default) "
                         "or 'none' (with --profile).")
  plan.add_argument('--profile', default=None,
                    help='Also consider the backend a `stoker profile --out DIR` directory measured.')
  plan.add_argument('--profile-price', type=float, default=1.0, help='$/h of the profiled backend (1.0).')
  plan.add_argument('--max-seqs', default='32,128', help='Batch caps to try (comma-separated).')
  plan.add_argument('--token-budgets', default='512,2048', help='Prefill chunks (token budgets) to try.')
  plan.add_argument('--tolerance', type=float, default=0.1, help='Capacity resolution, relative (0.1).')
  plan.add_argument('--router', default='least_outstanding', choices=['round_robin', 'least_outstanding'])
  plan.add_argument('--out', default='plan', help='Output directory: plan.json, plan.md, pareto.png.')
  plan.add_argument('--exhaustive', action='store_true',
                    help='Search every configuration (default: skip those whose throughput bound per dollar '
                         'cannot beat the best found; the answer is the same, the table shorter).')
  plan.add_argument('--no-plots', action='store_true')

  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  if args.host_devices is None:  # a step on one of 8 host devices took 30 ms where it took 23 ms on 1 of 1
    args.host_devices = min(getattr(args, 'tensor_parallel', 8), 8)
  _use_host_devices(args.host_devices)
  try:
    if args.command == 'prepare':
      return _prepare(args, argv)
    if args.command == 'convert':
      return _convert(args)
    if args.command == 'bench':
      return bench_flags.main(args)
    if args.command == 'k8s':
      return k8s.run(args)
    if args.command == 'plan':
      return _plan(args)
    if args.command == 'train' and args.supervise:
      from train.supervise import run_child, supervise  # pylint: disable=g-import-not-at-top
      child = _without_supervision(argv)
      return supervise(lambda on_signal: run_child(child, on_signal), args.max_restarts)
    if args.command == 'launch':
      return _launch(args)
    if args.command == 'train':
      return _train(args.gin_file or [QUICKSTART_GIN], args.gin_param, args.workdir)
    if args.command == 'serve':
      return _serve(args)
    if args.command == 'profile':
      return _profile(args)
    return _quickstart(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'stoker {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
