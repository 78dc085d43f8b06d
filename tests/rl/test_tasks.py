"""The addition task: sums are right, held-out prompts are never trained on, digits are single tokens."""

import json

import tokenizers

from rl import rewards, tasks


def test_rows_and_the_character_tokenizer(tmp_path):
  rows = tasks.rows(50, seed=1)
  for r in rows:
    a, b = map(int, r['prompt'][:-1].split('+'))
    assert r['answer'] == a + b and 10 <= a <= 99 and 10 <= b <= 99
  paths = tasks.write_task(str(tmp_path), train=300, held_out=40)
  tok = tokenizers.Tokenizer.from_file(paths['tokenizer'])
  ids = tok.encode('47+38= 85', add_special_tokens=False).ids
  assert len(ids) == 9 and tok.decode(ids) == '47+38= 85'
  assert tok.token_to_id(tasks.EOS) == 0 and tok.get_vocab_size() == 1 + len(tasks.CHARS)
  read = lambda p: [json.loads(line) for line in open(p)]
  held = {r['prompt'] for r in read(paths['held_out'])}
  trained = read(paths['train'])
  assert len(held) > 30 and not held & {r['prompt'] for r in trained}
  sft = read(paths['sft'])
  assert len(sft) == len(trained)
  assert all(rewards.exact_answer(r, ' ' + s['text'].split('= ')[1]) for r, s in zip(trained, sft))
