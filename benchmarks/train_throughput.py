"""Training throughput: Stoker's JAX train step against a PyTorch `transformers` loop.

  python benchmarks/train_throughput.py                        # tiny + small, ~4.5 min on 2 CPU cores
  python benchmarks/train_throughput.py --presets tiny --runs 5 --steps 10
  python benchmarks/train_throughput.py --host_devices 8       # adds a JAX row on an 8-device mesh

Both sides train the same model (LlamaForCausalLM shapes, identical initial weights) on the same
batches with the same optimizer: AdamW (constant learning rate, decay on matrices only) after
global-norm clipping at 1.0, loss = masked mean next-token cross-entropy. Rows are full causal
rows (segment ids all 1, positions 0..T-1): PyTorch's SDPA path cannot express packed segments,
and Stoker's attention costs the same FLOPs with or without them.

Prints, per preset and framework, the median over --runs runs (each --steps steps, after warm-up)
of step time, tokens/s and MFU (ModelConfig.flops_per_token for both; peak from train.flops), and
the JAX/PyTorch tokens/s ratio; writes benchmarks/out/train_throughput.{json,png}.
On a CPU only the ratios carry over to other machines; absolute figures are this host's.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

# Per-preset workload when --batch_size/--seq_len/--steps are not given (sized for a 2-core CPU).
DEFAULTS = {'tiny': dict(batch_size=8, seq_len=128, steps=3),
            'small': dict(batch_size=4, seq_len=256, steps=1)}
FALLBACK = dict(batch_size=4, seq_len=256, steps=2)
# Below this median share of the host's cores a CPU measurement was disturbed by other load.
BUSY_CPU_SHARE = 0.85


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--presets', default='tiny,small', help='comma-separated models.presets names')
  p.add_argument('--batch_size', type=int, help='sequences per step (default: per preset)')
  p.add_argument('--seq_len', type=int, help='tokens per sequence (default: per preset)')
  p.add_argument('--steps', type=int, help='timed steps per run (default: per preset)')
  p.add_argument('--runs', type=int, default=5, help='timed runs per framework; medians are quoted')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps before the first run')
  p.add_argument('--host_devices', type=int, default=1,
                 help='JAX CPU devices (XLA_FLAGS); N > 1 adds a JAX row on an N-device mesh')
  p.add_argument('--learning_rate', type=float, default=3e-4)
  p.add_argument('--torch_compile', action='store_true', help='also time torch.compile(model)')
  p.add_argument('--jax_variant', action='append', default=[], type=_variant,
                 metavar='NAME:FIELD=VALUE[,FIELD=VALUE]',
                 help='extra JAX row with ModelConfig overrides, e.g. cudnn:attention=cudnn or '
                      'noscan:scan_layers=false (repeatable)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  args = p.parse_args(argv)
  for name in ('batch_size', 'seq_len', 'steps', 'runs', 'host_devices'):
    if getattr(args, name) is not None and getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}.')
  if args.warmup < 0:
    p.error(f'--warmup must be >= 0, got {args.warmup}.')
  return args


def _variant(text: str) -> tuple[str, dict]:
  """'name:field=value,...' -> (name, {field: value}); values are Python literals or strings."""
  name, sep, body = text.partition(':')
  if not sep or not name or not body:
    raise argparse.ArgumentTypeError(f'--jax_variant {text!r}: write NAME:FIELD=VALUE[,...].')
  overrides = {}
  for item in body.split(','):
    field, eq, value = item.partition('=')
    if not eq:
      raise argparse.ArgumentTypeError(f'--jax_variant {text!r}: {item!r} is not FIELD=VALUE.')
    value = {'true': 'True', 'false': 'False'}.get(value.lower(), value)
    try:
      overrides[field.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[field.strip()] = value
  return name, overrides


from _common import Clock, cpu_name, log, set_host_devices  # pylint: disable=g-import-not-at-top


if __name__ == '__main__':
  ARGS = parse_args()
  set_host_devices(ARGS.host_devices)

# pylint: disable=wrong-import-position  (jax must start after XLA_FLAGS is set)
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from data.synthetic import SyntheticData  # noqa: E402
from models import hf, presets  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from parallelism.mesh import MeshConfig, make_mesh  # noqa: E402
from train.config import OptimizerConfig, TrainConfig  # noqa: E402
from train.flops import total_peak_flops  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.step import batch_spec, compile_train_step, init_train_state  # noqa: E402


def full_row_batches(cfg: TrainConfig, count: int) -> list[dict[str, np.ndarray]]:
  """Synthetic batches as full causal rows; targets across document boundaries stay masked."""
  data = SyntheticData(cfg.model.vocab_size, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
  B, T = cfg.batch_size, cfg.seq_len
  out = []
  for i in range(count):
    b = data.batch(i)
    b['segment_ids'] = np.ones((B, T), np.int32)
    b['positions'] = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    out.append(b)
  return out


# ----------------------------------------------------------------------------- PyTorch side


def check_llama(cfg: ModelConfig) -> None:
  unmapped = [f for f in ('qkv_bias', 'qk_norm', 'rope_scaling') if getattr(cfg, f)]
  if unmapped:
    raise ValueError(f'This benchmark builds LlamaForCausalLM and does not map {unmapped}; pick '
                     'a plain Llama preset (tiny, small).')


def hf_llama(cfg: ModelConfig, seq_len: int, seed: int,
             device: str = 'cpu') -> transformers.LlamaForCausalLM:
  """LlamaForCausalLM with exactly the shapes of `cfg` (float32, HF's own initialisation)."""
  check_llama(cfg)
  config = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=max(seq_len, 2048), attn_implementation='sdpa')
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).float().to(device).train()
  count = sum(p.numel() for p in model.parameters())
  if count != cfg.num_params():
    raise AssertionError(f'LlamaForCausalLM has {count} parameters, ModelConfig '
                         f'{cfg.num_params()}: the shapes differ.')
  return model


def torch_trainer(model, opt_cfg: OptimizerConfig, compile_model: bool, compute_dtype: str):
  """Returns run(batches) -> ((seconds, cpu share), losses): one optimizer step per batch.

  Parameters stay float32; with compute_dtype bfloat16 (JAX's 'auto' on GPU) the forward pass
  runs under autocast, the counterpart of Stoker's mixed precision.
  """
  device = next(model.parameters()).device
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=compute_dtype == 'bfloat16')
  params = [p for p in model.parameters() if p.requires_grad]
  # Same decay mask as train/optimizer.py: matrices decay, norm scales do not.
  groups = [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': opt_cfg.weight_decay},
            {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
  opt = torch.optim.AdamW(groups, lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2),
                          eps=opt_cfg.eps)  # torch's default implementation for the device
  forward = torch.compile(model) if compile_model else model

  def step(b):
    with autocast:
      logits_BTV = forward(input_ids=b['inputs'], position_ids=b['positions']).logits
    nll = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1).float(),
                                            b['targets'].flatten(), reduction='none')
    mask = b['loss_mask'].flatten()
    loss = (nll * mask).sum() / mask.sum().clamp(min=1.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, opt_cfg.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  def run(host_batches):
    batches = [{k: torch.as_tensor(v, dtype=torch.long if v.dtype == np.int32 else None,
                                   device=device) for k, v in b.items()} for b in host_batches]
    _sync(device)
    clock = Clock()
    losses = [step(b) for b in batches]
    _sync(device)
    return clock.stop(cores=os.cpu_count()), [float(x) for x in losses]
  return run


def _sync(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- JAX side


def jax_trainer(cfg: TrainConfig, devices, weights: dict[str, np.ndarray]):
  """Stoker's compiled train step on a mesh over `devices`, starting from the HF `weights`.

  Returns (run, compile_seconds); run(batches) -> (seconds, losses).
  """
  mesh = make_mesh(cfg.mesh, devices)
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  state, shardings = init_train_state(cfg, mesh, tx)
  params = state.params
  nnx.replace_by_pure_dict(params, hf.params_from_hf(cfg.model, weights))
  state = state._replace(params=jax.device_put(params, shardings.params))
  start = time.perf_counter()
  step = compile_train_step(cfg, mesh, tx, shardings)
  compile_s = time.perf_counter() - start
  specs = batch_spec(cfg, mesh)
  holder = {'state': state}  # donated each step: keep only the newest

  def run(host_batches):
    batches = [{k: jax.device_put(v, specs[k].sharding) for k, v in b.items()}
               for b in host_batches]
    jax.block_until_ready(batches)
    state, losses = holder['state'], []
    clock = Clock()
    for b in batches:
      state, metrics = step(state, b)
      losses.append(metrics['loss'])
    jax.block_until_ready((state, losses))
    times = clock.stop(cores=os.cpu_count())
    holder['state'] = state
    return times, [float(x) for x in losses]
  return run, compile_s


def data_parallel_mesh(batch_size: int, n: int) -> MeshConfig:
  """As much data parallelism as the batch allows on n devices, tensor parallelism for the rest."""
  data = math.gcd(batch_size, n)
  return MeshConfig(ici=(data, 1, n // data))


# ----------------------------------------------------------------------------- measurement


def measure(name: str, args: argparse.Namespace, peak_flops: float) -> dict:
  """All frameworks on one preset: interleaved runs, same batches in the same order."""
  shape = {**DEFAULTS.get(name, FALLBACK),
           **{k: getattr(args, k) for k in ('batch_size', 'seq_len', 'steps')
              if getattr(args, k) is not None}}
  model_cfg = presets.preset(name)
  opt_cfg = OptimizerConfig(learning_rate=args.learning_rate, warmup_steps=0, min_lr_ratio=1.0)
  total = args.warmup + args.runs * shape['steps']
  cfg = TrainConfig(model=model_cfg, mesh=MeshConfig(ici=(1, 1, 1)), optimizer=opt_cfg,
                    steps=total, batch_size=shape['batch_size'], seq_len=shape['seq_len'],
                    seed=args.seed)
  log(f'[{name}] {model_cfg.num_params() / 1e6:.1f}M params, batch {cfg.batch_size}x{cfg.seq_len}, '
      f'{args.warmup} warm-up + {args.runs} runs x {shape["steps"]} steps')
  batches = full_row_batches(cfg, total)

  backend = jax.default_backend()
  device = {'cpu': 'cpu', 'gpu': 'cuda'}.get(backend)
  if device is None or (device == 'cuda' and not torch.cuda.is_available()):
    raise ValueError(f'JAX runs on {backend!r}; PyTorch needs the same kind of device here '
                     '(cpu, or gpu with a CUDA build of torch).')
  model = hf_llama(model_cfg, cfg.seq_len, args.seed, device)
  dtype = model_cfg.compute_dtype(backend)
  weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  trainers, setup_s = {}, {}
  devices = jax.devices()
  jax_rows = [('jax', cfg, devices[:1])]
  for variant, overrides in args.jax_variant:
    jax_rows.append((f'jax_{variant}', dataclasses.replace(
        cfg, model=presets.preset(name, **overrides)), devices[:1]))
  if len(devices) > 1:
    n = len(devices)
    jax_rows.append((f'jax_{n}dev', dataclasses.replace(
        cfg, mesh=data_parallel_mesh(cfg.batch_size, n)), devices))
  for label, row_cfg, row_devices in jax_rows:
    trainers[label], setup_s[label] = jax_trainer(row_cfg, row_devices, weights)
    log(f'[{name}] {label}: compiled in {setup_s[label]:.1f} s on mesh {row_cfg.mesh.ici}')
  del weights
  trainers['pytorch'] = torch_trainer(model, opt_cfg, False, dtype)
  if args.torch_compile:
    compiled = hf_llama(model_cfg, cfg.seq_len, args.seed, device)
    trainers['pytorch_compile'] = torch_trainer(compiled, opt_cfg, True, dtype)

  results = {label: {'seconds': [], 'cpu_share': [], 'losses': []} for label in trainers}
  for label, run in trainers.items():
    if args.warmup:
      (seconds, _), losses = run(batches[:args.warmup])
      setup_s[label] = setup_s.get(label, 0.0) + seconds
      results[label]['losses'] += losses
  order = list(trainers)
  for r in range(args.runs):
    chunk = batches[args.warmup + r * shape['steps']:args.warmup + (r + 1) * shape['steps']]
    for label in (order if r % 2 == 0 else order[::-1]):  # alternate to cancel order effects
      (seconds, cpu_share), losses = trainers[label](chunk)
      results[label]['seconds'].append(seconds)
      results[label]['cpu_share'].append(cpu_share)
      results[label]['losses'] += losses
    log(f'[{name}] run {r + 1}/{args.runs}: ' + ', '.join(
        f'{k} {v["seconds"][-1] / shape["steps"]:.3f} s/step (cpu {v["cpu_share"][-1]:.0%})'
        for k, v in results.items()))

  tokens = cfg.batch_size * cfg.seq_len * shape['steps']
  flops_per_token = model_cfg.flops_per_token(cfg.seq_len)
  ref = results['pytorch']
  frameworks = {}
  for label, res in results.items():
    tps = [tokens / s for s in res['seconds']]
    frameworks[label] = {
        'step_time_s': [s / shape['steps'] for s in res['seconds']],
        'tokens_per_sec': tps,
        'cpu_share': res['cpu_share'],
        'median_step_time_s': statistics.median(s / shape['steps'] for s in res['seconds']),
        'median_tokens_per_sec': statistics.median(tps),
        'median_mfu': statistics.median(tps) * flops_per_token / peak_flops,
        'median_cpu_share': statistics.median(res['cpu_share']),
        # Run r of every framework ran back to back: their ratio sees the same background load.
        'paired_ratio_vs_pytorch': statistics.median(
            b / a for a, b in zip(res['seconds'], ref['seconds'])),
        'setup_s': setup_s[label],  # JAX: compile (+ warm-up steps); PyTorch: warm-up steps
        'losses': res['losses'],
        'max_abs_loss_diff_vs_pytorch': max(abs(a - b) for a, b in zip(res['losses'],
                                                                         ref['losses'])),
    }
  for f in frameworks.values():
    f['ratio_of_medians_vs_pytorch'] = (f['median_tokens_per_sec']
                                        / frameworks['pytorch']['median_tokens_per_sec'])
  return {'preset': name, 'params': model_cfg.num_params(), 'vocab_size': model_cfg.vocab_size,
          'batch_size': cfg.batch_size, 'seq_len': cfg.seq_len, 'steps_per_run': shape['steps'],
          'runs': args.runs, 'warmup_steps': args.warmup, 'flops_per_token': flops_per_token,
          'frameworks': frameworks}


def torch_matmul_flops(n: int = 1024, repeats: int = 7) -> float:
  """train.flops' CPU probe done through torch: tells whether torch's BLAS is the faster one."""
  a = torch.randn(n, n)
  a @ a
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times)


# ----------------------------------------------------------------------------- report


def machine() -> dict:
  cpu = cpu_name()
  dev = jax.devices()[0]
  return {'cpu': cpu, 'cpu_cores': os.cpu_count(), 'jax_backend': jax.default_backend(),
          'jax_device_kind': dev.device_kind, 'jax_devices': jax.device_count(),
          'torch_threads': torch.get_num_threads(), 'python': platform.python_version(),
          'jax': jax.__version__, 'torch': torch.__version__,
          'transformers': transformers.__version__}


def table(report: dict) -> str:
  m = report['machine']
  on_cpu = m['jax_backend'] == 'cpu'
  device = f"{m['cpu']}, {m['cpu_cores']} cores" if on_cpu else m['jax_device_kind']
  lines = [
      'Training throughput: Stoker JAX train step vs PyTorch transformers LlamaForCausalLM + AdamW',
      f"{device}; JAX {m['jax']} ({m['jax_backend']}, {m['jax_devices']} device(s)), torch "
      f"{m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}; "
      f"{report['date']}",
      f"MFU peak: {report['peak_flops'] / 1e9:,.1f} GFLOP/s (train.flops)" + (
          f"; torch's matmul probe now: {report['torch_matmul_flops'] / 1e9:,.1f} GFLOP/s"
          if report['torch_matmul_flops'] else ''),
      f"same initial weights, batches (full causal rows) and optimizer on every row; "
      f"compute {report['compute_dtype']}; medians over runs",
      '',
      f"{'preset':<15}{'batch':<9}{'framework':<16}{'step s':>8}{'tokens/s':>11}{'MFU':>7}"
      + (f"{'cpu':>6}" if on_cpu else '')
      + f"{'spread':>8}{'paired':>9}{'medians':>9}{'max|dloss|':>12}{'setup s':>9}",
  ]
  for res in report['results']:
    first = True
    for label, f in res['frameworks'].items():
      spread = (max(f['tokens_per_sec']) - min(f['tokens_per_sec'])) / f['median_tokens_per_sec']
      head = (f"{res['preset'] + ' (' + format(res['params'] / 1e6, '.0f') + 'M)':<15}"
              f"{str(res['batch_size']) + 'x' + str(res['seq_len']):<9}" if first else '')
      lines.append(
          f"{head:<24}{label:<16}{f['median_step_time_s']:>8.3f}"
          f"{f['median_tokens_per_sec']:>11,.0f}{f['median_mfu']:>7.1%}"
          + (f"{f['median_cpu_share']:>6.0%}" if on_cpu else '')
          + f"{spread:>8.0%}"
          f"{f['paired_ratio_vs_pytorch']:>8.2f}x{f['ratio_of_medians_vs_pytorch']:>8.2f}x"
          f"{f['max_abs_loss_diff_vs_pytorch']:>12.1e}{f['setup_s']:>9.1f}")
      first = False
    losses = ', '.join(f"{k} {f['losses'][0]:.4f}" for k, f in res['frameworks'].items())
    lines.append(f"{'':<24}first-step loss: {losses} (log V = {math.log(res['vocab_size']):.4f}); "
                 f"{res['runs']} runs x {res['steps_per_run']} steps")
  lines += [
      '',
      'paired: median over runs of (PyTorch time / this time) for runs taken back to back, the',
      '  figure to quote (>1: faster than PyTorch); medians: ratio of the median tokens/s.',
  ]
  if on_cpu:
    lines += [
        'cpu: share of all cores this process used while timed; well below 100% means other load',
        '  on the host, which slows the frameworks unequally (PyTorch\'s OpenMP threads suffer',
        '  more than XLA\'s thread pool): such ratios are not this machine\'s, rerun when idle.',
    ]
  lines += [
      'spread: (max - min) / median tokens/s over runs. max|dloss|: largest per-step loss',
      '  difference from the PyTorch run (same weights and data: rounding differences only).',
      'setup s: compile (JAX; torch.compile inside its first step) plus the warm-up steps.',
  ]
  if on_cpu:
    busy = min(f['median_cpu_share'] for res in report['results']
               for f in res['frameworks'].values())
    if busy < BUSY_CPU_SHARE:
      lines += ['', f'WARNING: a median cpu share fell to {busy:.0%} (< {BUSY_CPU_SHARE:.0%}): the '
                'host was busy; do not quote these ratios.']
  return '\n'.join(lines)


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (only the report needs it)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  results = report['results']
  fig, axes = plt.subplots(1, len(results), figsize=(max(5.5, 4.2 * len(results)), 4.4),
                           squeeze=False)
  for ax, res in zip(axes[0], results):
    labels = list(res['frameworks'])
    med = [res['frameworks'][k]['median_tokens_per_sec'] for k in labels]
    lo = [m - min(res['frameworks'][k]['tokens_per_sec']) for m, k in zip(med, labels)]
    hi = [max(res['frameworks'][k]['tokens_per_sec']) - m for m, k in zip(med, labels)]
    colors = ['tab:orange' if k.startswith('pytorch') else 'tab:blue' for k in labels]
    bars = ax.bar(labels, med, yerr=[lo, hi], capsize=4, color=colors)
    for bar, k in zip(bars, labels):
      f = res['frameworks'][k]
      ax.annotate(f"{f['paired_ratio_vs_pytorch']:.2f}x\nMFU {f['median_mfu']:.0%}",
                  (bar.get_x() + bar.get_width() / 2, max(f['tokens_per_sec'])), ha='center',
                  va='bottom', fontsize=9, xytext=(0, 3), textcoords='offset points')
    ax.set_title(f"{res['preset']} ({res['params'] / 1e6:.0f}M), batch "
                 f"{res['batch_size']}x{res['seq_len']}")
    ax.set_ylabel('tokens/s (median, min-max bars)')
    ax.yaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
    plt.setp(ax.get_xticklabels(), rotation=20, ha='right', rotation_mode='anchor')
    ax.set_ylim(0, max(max(f['tokens_per_sec']) for f in res['frameworks'].values()) * 1.25)
  m = report['machine']
  device = (f"{m['cpu']}, {m['cpu_cores']} cores" if m['jax_backend'] == 'cpu'
            else m['jax_device_kind'])
  fig.suptitle(f"Training throughput (bar labels: paired ratio vs PyTorch)\n{device}, "
               f"{report['compute_dtype']} compute; {report['date']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(args: argparse.Namespace) -> dict:
  torch.set_num_threads(os.cpu_count())
  names = [n.strip() for n in args.presets.split(',') if n.strip()]
  for n in names:
    check_llama(presets.preset(n))  # fails early on an unknown or unmappable preset
    for _, overrides in args.jax_variant:
      presets.preset(n, **overrides)
  start = time.perf_counter()
  peak = total_peak_flops(jax.devices()[:1])
  report = {'date': datetime.date.today().isoformat(), 'machine': machine(),
            'peak_flops': peak,
            'compute_dtype': presets.preset(names[0]).compute_dtype(jax.default_backend()),
            'torch_matmul_flops': torch_matmul_flops() if jax.default_backend() == 'cpu' else None,
            'settings': {k: v for k, v in vars(args).items() if k != 'out_dir'},
            'results': [measure(n, args, peak) for n in names]}
  report['wall_s'] = time.perf_counter() - start
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'train_throughput.json'), 'w') as f:
    json.dump(report, f, indent=2)
  plot(report, os.path.join(args.out_dir, 'train_throughput.png'))
  print(table(report))
  print(f"\nwall time {report['wall_s']:.0f} s; wrote {args.out_dir}/train_throughput.json "
        "and .png")
  return report


if __name__ == '__main__':
  main(ARGS)
