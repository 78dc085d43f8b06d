"""Speculative decoding: a distilled draft model and prompt lookup against plain decoding (issue 25).

  python benchmarks/speculative.py                          # T = 1M tokens: ~24 + 8 min training, ~8 min measuring
  python benchmarks/speculative.py --target_model teacher    # the 12M teacher as the target (~12 + 7 min training)
  python benchmarks/speculative.py --target benchmarks/out/compression/teacher   # reuse a trained target
  python benchmarks/speculative.py --tokens 40000 --new_tokens 24 --runs 1 --prompts 2   # smoke, minutes

One process, on the stdlib corpus (4096-token BPE). The target (WIDE: ~31M params, width 768, 4 layers, whose
batch-1 step reads its weights from memory, so that a verification of k + 1 tokens costs ~1.2 plain steps on
XLA:CPU; or --target_model teacher, compression.py's ~12M teacher of width 384, where it costs ~1.5) trains
on T tokens, or is given (--target); the drafter (~1.0M params: width 128, 2 layers, tied embeddings;
0.032 of the wide target, 0.086 of the teacher) is distilled from it on --draft_tokens (default T;
train/distill.py): distilled on T/4 tokens, a 1-layer drafter agreed with the target's
greedy token 42% of the time, on T 68%.
Prompts: code completion, --prompt_len tokens of stdlib Python source cut at random lines.

For batch 1 and 16, greedy and temperature 0.8, each engine decodes --new_tokens tokens per
prompt after its prefill (decode tokens/s: from every request's first token to the last), runs
interleaved (the engines' order rotating), median of --runs: plain (speculation off), the draft model
(k = --k) and prompt lookup (ngram); batch 16 decodes its group --batch16_repeats times a run.
Reported per row: tokens/s and the speed-up over plain, the median of each run's ratio in that run;
for speculation the acceptance rate (accepted / drafted tokens, vLLM's), Leviathan et al.'s per-token a
(accepted / (accepted + rejections): a draft is tried only while those before it were accepted), the
drafter/target step-time ratio c (a drafter step as it runs inside speculation, from the drafter's measured
seconds, over a plain target step; c_alone in the JSON: the drafter's own plain decode), the speed-up Leviathan et
al. predict from them, E(a, k) / (k c + 1) with E = (1 - a^(k+1)) / (1 - a), and measured / predicted;
v, a verification round's target step (host work included: speculative steps are synchronous) over a
plain step, and the prediction with it, E / (k c + v). k = 3 by default: k + 1 tokens fill the
4-token bucket (k = 4 pads to 8, a dearer step).
speculative_max_batch is --max_batch (default 4): at batch 16 the engine backs off to plain
decoding, so the row shows what the back-off costs. Writes benchmarks/out/speculative.{json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import sys
import time

from _common import cpu_name, huge_pages, log, set_host_devices

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# 2 layers of width 128 sharing the embedding with the LM head: greedy agreement with the target 0.75,
# against 0.68 for 1 layer untied (1.29M) and 0.73 for 1 tied layer of width 192 (1.33M), all on T = 1M.
DRAFTER = ['model.vocab_size=4096', 'model.d_model=128', 'model.num_layers=2', 'model.num_heads=2',
           'model.num_kv_heads=1', 'model.head_dim=64', 'model.mlp_dim=512', 'model.tie_embeddings=True']


# A target whose batch-1 decode reads its weights from memory: at width 768 XLA:CPU runs a 4-row product in about
# the time of a 1-row one (out-major weights, serve/engine_config.py), where at the teacher's 384 it takes ~2.3x.
WIDE = ['model.vocab_size=4096', 'model.d_model=768', 'model.num_layers=4', 'model.num_heads=12',
        'model.num_kv_heads=4', 'model.head_dim=64', 'model.mlp_dim=2048']


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--target', default=None, help='a trained target workdir (default: train one on --tokens)')
  p.add_argument('--target_model', choices=('teacher', 'wide'), default='wide',
                 help='the target trained without --target: compression.py\'s teacher (~12M, width 384) or WIDE '
                 '(~31M, width 768, 4 layers)')
  p.add_argument('--tokens', type=int, default=1_000_000, help='T: the target\'s training tokens')
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--learning_rate', type=float, default=None, help='the target\'s (default: 2e-3 wide, 3e-3 teacher)')
  p.add_argument('--distill_learning_rate', type=float, default=3e-3)
  p.add_argument('--draft_tokens', type=int, default=None, help='the drafter\'s distillation tokens '
                 '(default: --tokens)')
  p.add_argument('--k', type=int, default=3, help='draft tokens per verification')
  p.add_argument('--max_batch', type=int, default=4, help='EngineConfig.speculative_max_batch')
  p.add_argument('--prompt_len', type=int, default=128)
  p.add_argument('--new_tokens', type=int, default=96, help='tokens decoded per request')
  p.add_argument('--prompts', type=int, default=8, help='prompts: batch 1 decodes each alone, batch 16 '
                 'cycles through them')
  p.add_argument('--runs', type=int, default=5)
  p.add_argument('--batch16_repeats', type=int, default=3, help='times a batch-16 run decodes its group')
  p.add_argument('--host_devices', type=int, default=1)
  p.add_argument('--workdir', default=None, help='where the models train (default: benchmarks/out/speculative_wide, '
                 'or benchmarks/out/speculative for the teacher)')
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  args = p.parse_args(argv)
  teacher = args.target_model == 'teacher'
  args.learning_rate = args.learning_rate or (3e-3 if teacher else 2e-3)
  args.workdir = args.workdir or os.path.join(os.path.dirname(__file__), 'out', 'speculative' if teacher
                                              else 'speculative_wide')
  return args


def code_prompts(tokenizer_path: str, n: int, length: int, seed: int = 0) -> list[list[int]]:
  """n prompts of `length` tokens: stdlib Python source from a random line of a random file on."""
  import random  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer.from_file(tokenizer_path)
  files = sorted(f for f in glob.glob(os.path.join(os.path.dirname(os.__file__), '*.py'))
                 if os.path.getsize(f) > 20_000)
  rng, out = random.Random(seed), []
  while len(out) < n:
    lines = open(rng.choice(files), encoding='utf-8', errors='replace').read().splitlines(True)
    start = rng.randrange(len(lines) // 2)
    ids = tok.encode(''.join(lines[start:start + 400])).ids
    if len(ids) >= length:
      out.append(ids[:length])
  return out


def decode_time(engine, prompts, params) -> tuple[int, float]:
  """(tokens, seconds) of decoding `prompts` together: from every request's first token to the end."""
  ids = [f'r{engine.stats["steps"]}-{i}' for i in range(len(prompts))]
  for rid, prompt in zip(ids, prompts):
    engine.add_request(rid, prompt, params)
  started, tokens, clock = set(), 0, None
  while engine.has_work:
    outputs = engine.step()
    if clock is not None:
      tokens += sum(len(o.new_token_ids) for o in outputs)
    started.update(o.request_id for o in outputs)
    if clock is None and len(started) == len(ids):
      clock = time.perf_counter()
  return tokens, time.perf_counter() - clock


def main(argv=None, pages: str = 'huge pages: not asked for') -> int:
  args = parse_args(argv)
  set_host_devices(args.host_devices)
  import jax  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top
  from compression import TEACHER, recipe, train_run  # pylint: disable=g-import-not-at-top
  from models import checkpoint_io  # pylint: disable=g-import-not-at-top
  from serve import speculative  # pylint: disable=g-import-not-at-top
  from serve.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from serve.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  from train import datasets  # pylint: disable=g-import-not-at-top

  root = args.workdir
  os.makedirs(root, exist_ok=True)
  per_step = args.batch_size * args.seq_len
  steps_T = max(1, args.tokens // per_step)
  base = ['train/tiny_cpu.gin']
  target = args.target or os.path.join(root, 'target')
  shape = WIDE if args.target_model == 'wide' else TEACHER
  if args.target is None:
    train_run('target', target, base, recipe(args, steps_T) + shape)
    width = checkpoint_io.load(target)[0].d_model
    if f'model.d_model={width}' not in shape:
      raise SystemExit(f'{target} holds a target of width {width}, not the {args.target_model} model: pass '
                       f'--workdir for a fresh one, or --target {target} to measure it.')
  drafter = os.path.join(root, 'drafter')
  args.learning_rate = args.distill_learning_rate
  draft_steps = max(1, (args.draft_tokens or args.tokens) // per_step)
  train_run('drafter', drafter, base, recipe(args, draft_steps) + DRAFTER + [
      f"distill.teacher='{target}'", 'distill.alpha=0.5'])

  cfg = configs.load_train_config(base, recipe(args, steps_T) + TEACHER)
  tokenizer = os.path.join(datasets.data_dir(cfg), 'tokenizer.json')
  prompts = code_prompts(tokenizer, args.prompts, args.prompt_len)
  (target_cfg, target_params), (draft_cfg, draft_params) = (
      checkpoint_io.load(target), checkpoint_io.load(drafter))
  target_cfg = dataclasses.replace(target_cfg, remat='none')
  draft_cfg = dataclasses.replace(draft_cfg, remat='none')
  size = draft_cfg.num_params() / target_cfg.num_params()
  log(f'target {target_cfg.num_params():,} params, drafter {draft_cfg.num_params():,} ({size:.3f} of it)')

  G = 16
  M = -(-(args.prompt_len + args.new_tokens + args.k + 1) // G)
  plain_cfg = EngineConfig(max_seqs=16, page_size=G, max_pages_per_seq=M, num_pages=16 * M + 1,
                           token_budget=256, prefix_caching=False)
  spec = lambda mode: dataclasses.replace(plain_cfg, speculative=mode, num_speculative_tokens=args.k,
                                          speculative_max_batch=args.max_batch)
  engines = {'plain': Engine(target_cfg, target_params, plain_cfg),
             'draft': Engine(target_cfg, target_params, spec('draft')),
             'ngram': Engine(target_cfg, target_params, spec('ngram')),
             'drafter alone': Engine(draft_cfg, draft_params, plain_cfg)}
  engines['draft'].attach_drafter(Engine(draft_cfg, draft_params, speculative.draft_engine_config(spec('draft'))))

  from _engine_limits import probe_now  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))
  probes = {'start': probe_now(cores)}  # a cpu share under 90%: the speed-ups are not results
  log(f"{probes['start']}; {pages}")
  results = []
  for batch in (1, 16):
    for temperature in (0.0, 0.8):
      params = SamplingParams(max_tokens=args.new_tokens, temperature=temperature, seed=0)
      # batch 16 decodes its group --batch16_repeats times a run: a run of each batch then times a
      # comparable stretch (~2 s), not 0.6 s that one hypervisor hiccup moves by 10-20%.
      groups = [[p] for p in prompts] if batch == 1 else [(prompts * 16)[:16]] * args.batch16_repeats
      for name, engine in engines.items():  # warm-up: every bucket compiled and dispatched
        decode_time(engine, groups[0], dataclasses.replace(params, max_tokens=8))
      rates = {name: [] for name in engines}
      before = {name: dataclasses.replace(e.spec_stats) for name, e in engines.items()}
      steps_before = {name: e.stats['steps'] for name, e in engines.items()}
      spent = dict.fromkeys(engines, 0.0)
      names = list(engines)
      for run in range(args.runs):  # a run: every group through every engine, interleaved; the
        # engines' order rotates from run to run so that none always follows the same one
        order = names[run % len(names):] + names[:run % len(names)]
        totals = {name: [0, 0.0] for name in engines}
        for group in groups:
          for name in order:
            engine = engines[name]
            tokens, seconds = decode_time(engine, group, params)
            totals[name][0] += tokens
            totals[name][1] += seconds
        for name, (tokens, secs) in totals.items():
          rates[name].append(tokens / secs)
          spent[name] += secs
      rate = {name: statistics.median(r) for name, r in rates.items()}
      # the speed-up: the median over runs of each run's ratio to plain in that same run (paired:
      # the host's speed drifts between runs more than between engines within one)
      paired = {name: statistics.median(x / p for x, p in zip(r, rates['plain'])) for name, r in rates.items()}
      plain_step_s = batch / rate['plain']  # a plain decode step computes one token per sequence
      for name in ('draft', 'ngram'):
        d = engines[name].spec_stats.since(before[name])
        a = d.per_token_acceptance()
        # c: a drafter step as it runs inside speculation (synchronous) over a plain target step;
        # c_alone: the drafter's own plain decode step (overlapped) over the target's.
        c = d.draft_s / max(d.steps * args.k, 1) / plain_step_s
        # v: the target's seconds (all but the drafter's) per target step, over a plain step; the
        # prefill steps (one per request, before its clock starts) are few.
        v = (spent[name] - d.draft_s) / max(engines[name].stats['steps'] - steps_before[name], 1) / plain_step_s
        row = dict(drafter=name, batch=batch, temperature=temperature, tok_s=rate[name],
                   plain_tok_s=rate['plain'], speedup=paired[name], runs=rates[name], plain_runs=rates['plain'],
                   acceptance=d.accepted / d.drafted if d.drafted else 0.0, a=a,
                   verifications=d.verifications, backoff_steps=d.backoffs, paused=d.paused, k=args.k)
        row['c'] = c  # prompt lookup: its lookups' seconds per draft token, over a plain step
        row['predicted'] = speculative.predicted_speedup(a, args.k, c) if d.steps else 1.0
        row['measured_over_predicted'] = row['speedup'] / row['predicted']
        row['v'] = v
        row['predicted_v'] = speculative.predicted_speedup(a, args.k, c, v) if d.steps else 1.0
        if name == 'draft':
          row['c_alone'] = rate['plain'] / rate['drafter alone']
        results.append(row)
      log(f'batch {batch}, temperature {temperature}: ' +
          ', '.join(f'{n} {r:.1f} tok/s' for n, r in rate.items()) + f'; load {os.getloadavg()[0]:.2f}')

  probes['end'] = probe_now(cores, when='end')
  lines = [f'k = {args.k}, speculative_max_batch = {args.max_batch}; drafter {size:.3f} of the target\'s '
           f'params; {cpu_name()}, {cores} cores, load {os.getloadavg()[0]:.2f}; '
           f"{probes['start']}; {probes['end']}; {pages}.",
           f"{'drafter':<7} {'batch':>5} {'temp':>4} {'tok/s':>7} {'plain':>7} {'speed-up':>8} {'acc':>5} {'a':>5} "
           f"{'c':>5} {'predicted':>9} {'meas/pred':>9} {'v':>5} {'pred(v)':>7}"]
  for r in results:
    extra = (f"{r['c']:>5.3f} {r['predicted']:>9.2f} {r['measured_over_predicted']:>9.2f} {r['v']:>5.2f} "
             f"{r['predicted_v']:>7.2f}")
    lines.append(f"{r['drafter']:<7} {r['batch']:>5} {r['temperature']:>4} {r['tok_s']:>7.1f} "
                 f"{r['plain_tok_s']:>7.1f} {r['speedup']:>8.2f} {r['acceptance']:>5.2f} {r['a']:>5.2f} {extra}")
  print('\n'.join(lines))
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'speculative.json'), 'w') as f:
    json.dump({'args': vars(args), 'device': jax.devices()[0].device_kind, 'cpu': cpu_name(),
               'target_params': target_cfg.num_params(), 'drafter_params': draft_cfg.num_params(),
               'results': results, 'table': lines, 'probes': probes, 'huge_pages': pages}, f, indent=2)
  plot(results, os.path.join(args.out_dir, 'speculative.png'))
  return 0


def plot(results, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4))
  labels = [f"{r['drafter']} b{r['batch']} T{r['temperature']}" for r in results]
  ax.barh(range(len(results)), [r['speedup'] for r in results], label='measured')
  ax.scatter([r['predicted'] for r in results], range(len(results)), color='k',
             zorder=3, label='predicted from a, c')
  ax.axvline(1.0, color='k', lw=0.8)
  ax.set_yticks(range(len(results)), labels)
  ax.invert_yaxis()
  ax.set_xlabel('decode tokens/s over plain decoding (same run)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


if __name__ == '__main__':
  pages = huge_pages()
  sys.exit(main(pages=pages))
