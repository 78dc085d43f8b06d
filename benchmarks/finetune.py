"""LoRA supervised fine-tuning end to end: chat data -> `stoker train` with lora.* -> `stoker serve`.

    python benchmarks/finetune.py [--steps 200] [--lr 3e-3] [--out benchmarks/results/finetune]

A synthetic chat task simple enough for the tiny preset: the user asks to say a word ("please say:
river again") and the answer is the word. 30 words, each asked 12 times in phrasings drawn from 40
of the 48 prefix x suffix combinations, are prepared with `stoker prepare --format chat` (the loss
on the answers only). The base is the tiny preset at
step 0 (random weights: everything it does afterwards the adapters learned); LoRA rank 8 over
attention and MLP trains on top. The fine-tuned workdir is then served by a real `stoker serve
--checkpoint` process (it merges the adapters into the base at load) and asked, greedily through
the OpenAI chat API, every word in the 8 phrasings never seen in training (and 2 seen ones); an
answer counts when its text is exactly the word. Prints (and writes as JSON) the exact-match rate on held-out and seen
phrasings, the loss curve, and the times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import log  # pylint: disable=wrong-import-position
from serve_bench import REPO, free_port, stoker, wait_healthy  # pylint: disable=wrong-import-position

WORDS = ['apple', 'river', 'stone', 'cloud', 'piano', 'tiger', 'lemon', 'candle', 'mirror', 'garden',
         'rocket', 'window', 'silver', 'forest', 'bottle', 'pencil', 'island', 'jacket', 'butter',
         'dragon', 'violet', 'planet', 'castle', 'button', 'rabbit', 'winter', 'marble', 'ladder',
         'pepper', 'anchor']
PREFIXES = ['', 'please ', 'now ', 'could you ', 'just ', 'kindly ', 'quickly ', 'gently ']
SUFFIXES = ['', ' please', ' now', ' again', ' thanks', '!']
PHRASINGS = [p + 'say: {}' + s for p in PREFIXES for s in SUFFIXES]
HELD_OUT = PHRASINGS[5::6]  # 8 of the 48 combinations: each part is seen, never the whole
SEEN = [p for p in PHRASINGS if p not in HELD_OUT]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--lr', type=float, default=3e-3)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'finetune'))
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  work = os.path.join(args.out, time.strftime('run-%Y%m%d-%H%M%S'))
  os.makedirs(work)
  rng = random.Random(0)
  with open(os.path.join(work, 'chat.jsonl'), 'w') as f:
    for w in WORDS:
      for _ in range(12):
        f.write(json.dumps({'messages': [{'role': 'user', 'content': rng.choice(SEEN).format(w)},
                                         {'role': 'assistant', 'content': w}]}) + '\n')
  data, base, tuned = (os.path.join(work, n) for n in ('data', 'base', 'sft'))
  run = lambda *a: subprocess.run(stoker(*a), check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  clock = time.perf_counter()
  run('prepare', '--source', os.path.join(work, 'chat.jsonl'), '--format', 'chat', '--train-tokenizer',
      '--vocab-size', '400', '--validation-fraction', '0.05', '--out', data)
  common = ['--gin_file', 'train/tiny_cpu.gin', '--gin_param', 'model.vocab_size=512',
            '--gin_param', 'data.eval_every=0', '--gin_param', 'train.seq_len=32',
            '--gin_param', 'train.batch_size=16', '--gin_param', 'train.log_every=20',
            '--gin_param', 'optimizer.warmup_steps=10']
  run('train', *common, '--gin_param', "data.source='synthetic'", '--gin_param', 'train.steps=1',
      '--workdir', base)  # the base: the tiny preset at its initialisation (one step)
  prepared = time.perf_counter() - clock
  clock = time.perf_counter()
  run('train', *common, '--gin_param', f"data.source='{data}'", '--gin_param', f'train.steps={args.steps}',
      '--gin_param', f"lora.base='{base}'", '--gin_param', f'lora.rank={args.rank}',
      '--gin_param', f'lora.alpha={2.0 * args.rank}', '--gin_param', f'optimizer.learning_rate={args.lr}',
      '--workdir', tuned)
  trained = time.perf_counter() - clock
  with open(os.path.join(tuned, 'metrics.jsonl')) as f:
    losses = [r['loss'] for r in map(json.loads, f) if 'loss' in r]
  result = {'steps': args.steps, 'lr': args.lr, 'rank': args.rank, 'loss': losses,
            'prepare_s': round(prepared, 1), 'train_s': round(trained, 1)}
  result.update(_ask(tuned))
  with open(os.path.join(args.out, 'finetune.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(f"LoRA SFT (tiny preset, rank {args.rank}, {args.steps} steps, lr {args.lr}): loss "
        f"{losses[0]:.3f} -> {losses[-1]:.4f}; exact match through stoker serve: held-out phrasings "
        f"{result['held_out']:.1%} ({result['held_out_n']} prompts), seen phrasings {result['seen']:.1%}; "
        f"train {trained:.0f} s")
  return 0


def _ask(workdir: str) -> dict:
  """Exact-match rates of a real `stoker serve --checkpoint workdir`, greedy, through the OpenAI API."""
  import openai  # pylint: disable=g-import-not-at-top
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  with open(os.path.join(workdir, 'serve.log'), 'w') as server_log:
    server = subprocess.Popen(stoker('serve', '--checkpoint', workdir, '--port', str(port)),
                              stdout=server_log, stderr=subprocess.STDOUT, cwd=REPO)
  try:
    wait_healthy(url, server)
    client = openai.OpenAI(base_url=f'{url}/v1', api_key='unused')
    model = client.models.list().data[0].id
    out = {}
    for name, phrasings in (('held_out', HELD_OUT), ('seen', SEEN[:2])):
      right = total = 0
      for w in WORDS:
        for phrase in phrasings:
          answer = client.chat.completions.create(
              model=model, messages=[{'role': 'user', 'content': phrase.format(w)}], temperature=0,
              max_tokens=8).choices[0].message.content
          right += answer.strip() == w
          total += 1
      out[name], out[f'{name}_n'] = right / total, total
      log(f'{name}: {right}/{total}')
    return out
  finally:
    server.terminate()
    server.wait(timeout=60)


if __name__ == '__main__':
  sys.exit(main())
