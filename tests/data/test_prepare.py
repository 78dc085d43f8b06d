"""`stoker prepare` on tiny corpora: cleaning, dedup, filters, split, shards, determinism, bad input."""

import glob
import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from data import prepare
from data import shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ('the', 'stoker', 'feeds', 'coal', 'into', 'a', 'furnace', 'while', 'train', 'runs', 'north', 'café',
         'naïve', 'über', '東京', '🚂', 'fire', 'steam', 'engine', 'def', 'return', '(x)', '+=', '\n', '\t')


def _documents(n=40, seed=0):
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def _write_text_corpus(directory, docs):
  os.makedirs(directory, exist_ok=True)
  for i, doc in enumerate(docs):
    ext = 'md' if i % 3 == 0 else 'txt'
    with open(os.path.join(directory, f'doc{i:03d}.{ext}'), 'w', encoding='utf-8', newline='') as f:
      f.write(doc)
  return str(directory)


def _run(out, **kwargs):
  kwargs.setdefault('train_tokenizer', 'tokenizer' not in kwargs)
  kwargs.setdefault('vocab_size', 300)
  return prepare.prepare(prepare.PrepareConfig(**kwargs), str(out))


def _read_split(out, manifest, split):
  """doc_id -> tokens, reading each shard's row groups as a reader would, checking what the manifest says."""
  docs = {}
  for shard in manifest['splits'][split]['shards']:
    path = os.path.join(out, shard['path'])
    assert shards.sha256_file(path) == shard['sha256']
    parquet = pq.ParquetFile(path)
    assert parquet.schema_arrow == pa.schema([('tokens', pa.list_(pa.int32())), ('doc_id', pa.int64())])
    assert parquet.metadata.num_row_groups == shard['row_groups']
    assert parquet.metadata.row_group(0).column(0).compression == 'ZSTD'
    table = parquet.read()
    assert table.num_rows == shard['rows']
    assert sum(len(t) for t in table['tokens'].to_pylist()) == shard['tokens']
    for doc_id, tokens in zip(table['doc_id'].to_pylist(), table['tokens'].to_pylist()):
      docs[doc_id] = tokens
  return docs


def _hashes(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = shards.sha256_file(path)
  return out


def _leftovers(tmp_path, name):
  return sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / f'{name}*')))


def test_clean_normalises_line_ends_strips_controls_and_composes():
  assert prepare.clean('\ufeffcafe\u0301\r\nx\x00\x1b\ty\rz\x85\x7f\u200d') == 'café\nx\ty\nz\u200d'


def test_plan_shards_by_hand():
  assert shards.plan_shards([3, 3, 3, 10, 1, 1], 6) == [(0, 2), (2, 3), (3, 4), (4, 6)]
  assert shards.plan_shards([], 6) == []


def test_round_trip_dedup_filters_and_manifest(tmp_path):
  docs = _documents()
  raw = docs + [docs[3], docs[5].replace('\n', '\r\n'), 'x', 'y' * 5000, '\x00\x01',
                'cafe\u0301 <|endoftext|> ' + docs[7]]
  src = _write_text_corpus(tmp_path / 'src', raw)
  manifest = _run(tmp_path / 'out', source=src, min_chars=2, max_chars=4000, validation_fraction=0.2)
  # Expected by hand: files are read in name order (= raw order); docs[3] again and docs[5] with CRLF are
  # duplicates; 'x' (1 char), the 5000-char doc and the all-control doc (empty once cleaned) are filtered.
  expected = docs + ['café <|endoftext|> ' + docs[7]]  # the literal text, not the EOS token
  assert manifest['documents'] == {'read': 46, 'duplicates': 2, 'filtered': 3, 'kept': 41}
  out = str(tmp_path / 'out')
  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(out, 'tokenizer.json'))
  assert manifest['eos_id'] == tokenizer.token_to_id('<|endoftext|>') == 0
  assert manifest['tokenizer'] == {'path': 'tokenizer.json', 'vocab_size': tokenizer.get_vocab_size(),
                                   'sha256': shards.sha256_file(os.path.join(out, 'tokenizer.json')),
                                   'trained': True, 'eos_token': '<|endoftext|>'}
  assert tokenizer.get_vocab_size() <= 300
  train, val = _read_split(out, manifest, 'train'), _read_split(out, manifest, 'validation')
  assert not set(train) & set(val) and set(train) | set(val) == set(range(len(expected)))
  assert len(val) == round(0.2 * len(expected)) == manifest['splits']['validation']['documents']
  for doc_id, tokens in {**train, **val}.items():
    assert tokens[-1] == 0 and 0 not in tokens[:-1]
    assert tokenizer.decode(tokens[:-1], skip_special_tokens=False) == expected[doc_id]
  assert manifest['splits']['train']['tokens'] == sum(map(len, train.values()))
  with open(os.path.join(out, 'manifest.json')) as f:
    text = f.read()
  assert json.loads(text) == manifest
  assert text == json.dumps(manifest, sort_keys=True, indent=2) + '\n'
  assert manifest['format'] == 'stoker-tokens-v1' and manifest['seed'] == 0
  assert str(tmp_path / 'out') not in text  # the command records --out as <out>
  assert '--out <out>' in manifest['command']
  assert _leftovers(tmp_path, 'out') == ['out']


def test_shard_bounds_and_row_groups(tmp_path):
  src = _write_text_corpus(tmp_path / 'src', _documents(60))
  manifest = _run(tmp_path / 'out', source=src, shard_max_tokens=300, row_group_size=3, validation_fraction=0.1)
  for split in prepare.SPLITS:
    entries = manifest['splits'][split]['shards']
    n = len(entries)
    assert [e['path'] for e in entries] == [f'{split}/shard-{i:05d}-of-{n:05d}.parquet' for i in range(n)]
    assert sorted(os.listdir(tmp_path / 'out' / split)) == [os.path.basename(e['path']) for e in entries]
    doc_ids = []
    for e in entries:
      assert e['tokens'] <= 300 or e['rows'] == 1
      metadata = pq.ParquetFile(tmp_path / 'out' / e['path']).metadata
      sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
      assert max(sizes) <= 3 and sum(sizes) == e['rows']
      doc_ids += pq.read_table(tmp_path / 'out' / e['path'])['doc_id'].to_pylist()
    assert doc_ids == sorted(doc_ids)  # documents go to shards in order
  assert len(manifest['splits']['train']['shards']) > 3


def test_two_runs_are_byte_identical(tmp_path):
  src = _write_text_corpus(tmp_path / 'src', _documents())
  for out in ('a', 'b'):
    prepare.prepare(prepare.PrepareConfig(source=src, train_tokenizer=True, vocab_size=300, shard_max_tokens=200),
                    str(tmp_path / out), argv=['prepare', '--source', src, '--out', str(tmp_path / out)])
  a, b = _hashes(tmp_path / 'a'), _hashes(tmp_path / 'b')
  assert a == b and 'manifest.json' in a and len(a) > 4


def test_jsonl_csv_parquet_give_the_same_shards_as_text(tmp_path):
  docs = _documents(30)
  text = _run(tmp_path / 'text', source=_write_text_corpus(tmp_path / 'src', docs))
  tokenizer_path = str(tmp_path / 'text' / 'tokenizer.json')
  (tmp_path / 'in').mkdir()
  with open(tmp_path / 'in' / 'c.jsonl', 'w', encoding='utf-8') as f:
    f.writelines(json.dumps({'id': i, 'body': d}) + '\n' for i, d in enumerate(docs))
  pa_table = pa.table({'id': list(range(len(docs))), 'body': docs})
  pq.write_table(pa_table, tmp_path / 'in' / 'c.parquet', row_group_size=7)
  _write_csv(tmp_path / 'in' / 'c.csv', docs)
  for fmt in ('jsonl', 'csv', 'parquet'):
    other = _run(tmp_path / fmt, source=str(tmp_path / 'in' / f'c.{fmt}'), field='body', tokenizer=tokenizer_path)
    assert other['tokenizer']['trained'] is False
    assert other['tokenizer']['sha256'] == text['tokenizer']['sha256']
    assert other['splits'] == text['splits'], fmt


def _write_csv(path, docs):
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, 'w', encoding='utf-8', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['id', 'body'])
    writer.writerows(enumerate(docs))


def test_arrayrecord_output_is_refused_with_the_reason(tmp_path):
  src = _write_text_corpus(tmp_path / 'src', _documents())
  with pytest.raises(ValueError, match='only parquet is written, the format the training pipeline reads'):
    _run(tmp_path / 'ar', source=src, output_format='arrayrecord')
  assert not os.path.exists(tmp_path / 'ar')


def test_stdlib_subset_is_deterministic(tmp_path):
  for out in ('a', 'b'):
    manifest = _run(tmp_path / out, limit_files=25, vocab_size=512)
  assert _hashes(tmp_path / 'a') == _hashes(tmp_path / 'b')
  assert manifest['source']['kind'] == 'stdlib' and manifest['source']['limit_files'] == 25
  assert manifest['source']['files'] + len(manifest['source']['skipped']) == 25
  assert manifest['documents']['kept'] > 10


def test_existing_output_is_refused_unless_overwrite(tmp_path):
  src = _write_text_corpus(tmp_path / 'src', _documents(10))
  first = _run(tmp_path / 'out', source=src)
  with pytest.raises(ValueError, match='already holds a prepared dataset.*--overwrite'):
    _run(tmp_path / 'out', source=src)
  assert _run(tmp_path / 'out', source=src, overwrite=True)['splits'] == first['splits']
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'keep.txt').write_text('mine')
  with pytest.raises(ValueError, match='not a `stoker prepare` output'):
    _run(tmp_path / 'other', source=src, overwrite=True)
  assert _leftovers(tmp_path, 'out') == ['out'] and _leftovers(tmp_path, 'other') == ['other']


def test_a_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
  src = _write_text_corpus(tmp_path / 'src', _documents(10))
  real = shards.write_split

  def write_then_fail(directory, split, *args, **kwargs):
    written = real(directory, split, *args, **kwargs)
    if split == 'validation':
      raise OSError('disk full')
    return written

  monkeypatch.setattr(shards, 'write_split', write_then_fail)
  with pytest.raises(OSError, match='disk full'):
    _run(tmp_path / 'out', source=src)
  assert _leftovers(tmp_path, 'out') == []


def _bad_inputs(tmp_path):
  """name -> (PrepareConfig kwargs, exception type, message pattern)."""
  good = _write_text_corpus(tmp_path / 'good', _documents(5))
  d = tmp_path / 'bad'
  d.mkdir()
  os.symlink(d / 'nowhere', d / 'gone.txt')
  (d / 'latin1.txt').write_bytes('ok\nna\xefve'.encode('latin-1'))
  (d / 'c.jsonl').write_text('{"text": "a"}\n\n{"text": "b"\n')
  (d / 'f.jsonl').write_text('{"text": "a"}\n{"body": "b", "id": 2}\n')
  (d / 'c.csv').write_text('id,body\n1,hello\n')
  pq.write_table(pa.table({'body': ['x'], 'id': [1]}), d / 'p.parquet')
  (d / 'bad.parquet').write_bytes(b'PAR1 this is not parquet')
  (d / 'tiny.txt').write_text('hi')
  big = tokenizers.Tokenizer(tokenizers.models.BPE())
  big.add_special_tokens(['<|endoftext|>'] + [f'<t{i}>' for i in range(600)])
  big.save(str(d / 'big.json'))
  return {
      'unreadable': (dict(source=str(d / 'gone.txt')), ValueError, r'cannot read .*gone\.txt'),
      'not utf-8': (dict(source=str(d / 'latin1.txt')), ValueError, r'latin1\.txt:2: not valid UTF-8'),
      'corrupt jsonl': (dict(source=str(d / 'c.jsonl')), ValueError, r'c\.jsonl:3: not valid JSON'),
      'missing field': (dict(source=str(d / 'f.jsonl')), ValueError,
                        r"f\.jsonl:2: no field 'text' \(fields: 'body', 'id'\): choose one with --field"),
      'missing column': (dict(source=str(d / 'c.csv')), ValueError,
                         r"c\.csv: no column 'text' \(columns: 'id', 'body'\)"),
      'missing parquet column': (dict(source=str(d / 'p.parquet')), ValueError,
                                 r"p\.parquet: no column 'text' \(columns: 'body', 'id'\)"),
      'corrupt parquet': (dict(source=str(d / 'bad.parquet')), ValueError, r'bad\.parquet: not a readable Parquet'),
      'no such source': (dict(source=str(d / 'none*.txt')), FileNotFoundError, 'matched no files'),
      'empty corpus': (dict(source=str(d / 'tiny.txt'), min_chars=10), ValueError,
                       r'empty corpus: 1 documents read .* 1 outside --min-chars 10'),
      'vocab too large (loaded)': (dict(source=good, tokenizer=str(d / 'big.json'), max_vocab=256), ValueError,
                                   r"tokenizer vocabulary 601 exceeds the model's vocab_size 256: train a smaller"),
      'vocab too large (trained)': (dict(source=good, vocab_size=4096, max_vocab=1024), ValueError,
                                    "tokenizer vocabulary 4096 exceeds the model's vocab_size 1024"),
      'no tokenizer': (dict(source=good, train_tokenizer=False), ValueError, 'exactly one of --tokenizer'),
  }


@pytest.mark.parametrize('case', ['unreadable', 'not utf-8', 'corrupt jsonl', 'missing field', 'missing column',
                                  'missing parquet column', 'corrupt parquet', 'no such source', 'empty corpus',
                                  'vocab too large (loaded)', 'vocab too large (trained)', 'no tokenizer'])
def test_bad_input_fails_clearly_and_leaves_nothing(tmp_path, case):
  kwargs, error, pattern = _bad_inputs(tmp_path)[case]
  with pytest.raises(error, match=pattern):
    _run(tmp_path / 'out', **kwargs)
  assert _leftovers(tmp_path, 'out') == []


def test_check_vocab(tmp_path):
  src = _write_text_corpus(tmp_path / 'src', _documents(10))
  vocab = _run(tmp_path / 'out', source=src)['tokenizer']['vocab_size']
  assert prepare.check_vocab(str(tmp_path / 'out'), vocab)['eos_id'] == 0
  with pytest.raises(ValueError, match=f"tokenizer vocabulary {vocab} exceeds the model's vocab_size {vocab - 1}"):
    prepare.check_vocab(str(tmp_path / 'out'), vocab - 1)
  with pytest.raises(FileNotFoundError, match='not a `stoker prepare` output'):
    prepare.check_vocab(str(tmp_path / 'src'), vocab)


def _stoker(*args):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  return subprocess.run([sys.executable, os.path.join(REPO, 'cli.py'), *args], env=env, capture_output=True,
                        text=True, timeout=300)


def test_cli_prepare_and_bad_input_exit_code(tmp_path):
  src = _write_text_corpus(tmp_path / 'src', _documents(20))
  out = str(tmp_path / 'out')
  ok = _stoker('prepare', '--source', src, '--out', out, '--train-tokenizer', '--vocab-size', '300',
               '--validation-fraction', '0.1')
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert f'Prepared {out}: 20 documents (train 18, validation 2)' in ok.stdout
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['command'] == (f'stoker prepare --source {src} --out <out> --train-tokenizer --vocab-size 300 '
                                 f'--validation-fraction 0.1')
  (tmp_path / 'rows.csv').write_text('id,body\n1,hello\n')
  bad = _stoker('prepare', '--source', str(tmp_path / 'rows.csv'), '--column', 'text', '--out',
                str(tmp_path / 'bad'), '--train-tokenizer')
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert "stoker prepare: error: " in bad.stderr and "no column 'text' (columns: 'id', 'body')" in bad.stderr
  assert 'Traceback' not in bad.stderr
  assert _leftovers(tmp_path, 'bad') == []


def test_chat_data_trains_on_the_assistant_turns_through_the_pipeline(tmp_path):
  from data import chat, pipeline
  words = ['apple', 'pear', 'plum', 'fig', 'lime', 'kiwi', 'date', 'sloe']
  rows = [{'messages': [{'role': 'user', 'content': f'say: {w}'}, {'role': 'assistant', 'content': w}]}
          for w in words] * 2  # the second copy is dropped as duplicates
  (tmp_path / 'chat.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  manifest = _run(tmp_path / 'out', source=str(tmp_path / 'chat.jsonl'), format='chat',
                  train_tokenizer=True, vocab_size=300, validation_fraction=0.25)
  assert manifest['documents']['duplicates'] == len(words)
  assert manifest['chat'] == {'template': 'default', 'train_on': 'assistant',
                              'skipped_tokens': 'stored as -1 - id'}
  tokenizer = tokenizers.Tokenizer.from_file(str(tmp_path / 'out' / 'tokenizer.json'))
  batches = pipeline.make_iterator(str(tmp_path / 'out'), 'train', seq_len=64, global_batch_size=2,
                                   num_epochs=1, shuffle=False, process_index=0, process_count=1)
  answers = []
  for batch in batches:
    for targets, mask in zip(batch['targets'], batch['loss_mask']):
      trained = [int(t) for t, m in zip(targets, mask) if m]
      answers += [a for a in tokenizer.decode(trained).split('\n') if a]
      assert (batch['inputs'] >= 0).all() and (batch['targets'] >= 0).all()
  # Each trained run is one answer (then EOS, which decodes to nothing); no prompt token is trained.
  assert len(answers) == len(set(answers)) == manifest['splits']['train']['documents']
  assert set(answers) <= set(words)
  assert chat.TRAIN_ON == ('assistant', 'all')
  with pytest.raises(ValueError, match=r'bad.jsonl:1: the conversation has no assistant turn'):
    (tmp_path / 'bad.jsonl').write_text(json.dumps({'messages': [{'role': 'user', 'content': 'x'}]}))
    _run(tmp_path / 'bad', source=str(tmp_path / 'bad.jsonl'), format='chat', train_tokenizer=True)
