"""The toy task GRPO is shown to learn on a CPU: two-digit addition, answered as a number.

A row is {"prompt": "47+38=", "answer": 85}; the completion is the answer (" 85") and the end of
text. The tokenizer is character-level, so every digit is its own token (a BPE would merge digit
pairs and make carrying a lookup): digits, '+', '=', a space, and the end-of-text token.
`write_task` writes what the recipe reads: prompts for RL (JSONL), a supervised corpus of solved
sums (JSONL `text`, for `stoker prepare --format jsonl --tokenizer`) and the tokenizer.
"""

from __future__ import annotations

import json
import os
import random

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

EOS = '<|endoftext|>'
CHARS = '0123456789+= '


def rows(n: int, seed: int, digits: int = 2) -> list[dict]:
  """n addition problems with operands of `digits` digits, drawn with `seed`."""
  rng = random.Random(seed)
  lo, hi = 10 ** (digits - 1), 10 ** digits - 1
  out = []
  for _ in range(n):
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    out.append({'prompt': f'{a}+{b}=', 'answer': a + b})
  return out


def tokenizer() -> tokenizers.Tokenizer:
  """Character-level: id 0 is the end of text, then one id per character of CHARS."""
  vocab = {EOS: 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=EOS))
  tok.pre_tokenizer = pre_tokenizers.Split('', 'isolated')
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([EOS])
  return tok


def write_task(directory: str, train: int = 4000, held_out: int = 200, seed: int = 0) -> dict:
  """prompts-train.jsonl, prompts-held-out.jsonl, sft.jsonl (solved train sums) and tokenizer.json."""
  os.makedirs(directory, exist_ok=True)
  data = rows(train + held_out, seed)
  held = {r['prompt'] for r in data[train:]}
  train_rows = [r for r in data[:train] if r['prompt'] not in held]
  paths = {'train': os.path.join(directory, 'prompts-train.jsonl'),
           'held_out': os.path.join(directory, 'prompts-held-out.jsonl'),
           'sft': os.path.join(directory, 'sft.jsonl'),
           'tokenizer': os.path.join(directory, 'tokenizer.json')}
  for name, part in (('train', train_rows), ('held_out', data[train:])):
    with open(paths[name], 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in part)
  with open(paths['sft'], 'w') as f:
    f.writelines(json.dumps({'text': f"{r['prompt']} {r['answer']}"}) + '\n' for r in train_rows)
  tokenizer().save(paths['tokenizer'])
  return paths
