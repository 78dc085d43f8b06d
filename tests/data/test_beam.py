"""`stoker prepare --runner beam` (data/beam.py) writes what the in-process path writes, byte for byte.

The pipeline tests need Apache Beam, the `beam` extra (which `dev`, CI's install, includes); they skip without it.
"""

import hashlib
import json
import os
import random

import pytest

import cli
from data import beam as data_beam
from data import prepare
from data import shards
from data import tokenizer as tok

WORDS = ('the', 'stoker', 'feeds', 'coal', 'into', 'a', 'furnace', 'while', 'train', 'runs', 'north', 'café',
         'naïve', '東京', '🚂', 'fire', 'steam', 'def', 'return', '(x)', '+=', '\n', '\t')
needs_beam = pytest.mark.skipif(data_beam.beam is None, reason="Apache Beam is not installed: pip install -e '.[beam]'")


def _documents(n, seed=0):
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(rng.randint(5, 50))) for _ in range(n)]


def _corpus(directory):
  """Three files (two JSONL, one CSV), each pair sharing a document, and the counts they must give."""
  docs = _documents(70)
  os.makedirs(directory)
  files = {'a.jsonl': docs[:30] + [docs[3], 'x', ''],  # docs[3] twice in one file; 'x' and '' filtered
           'b.jsonl': docs[30:55] + [docs[7], docs[40].replace('\n', '\r\n'), docs[10]],  # 3 from other files
           'c.csv': docs[55:] + [docs[31], docs[0]]}
  for name, texts in files.items():
    with open(os.path.join(directory, name), 'w', encoding='utf-8', newline='') as f:
      if name.endswith('.jsonl'):
        f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
      else:
        f.write('text\n' + ''.join('"' + t.replace('"', '""') + '"\n' for t in texts))
  read = sum(map(len, files.values()))
  return os.path.join(directory, '*'), {'read': read, 'duplicates': 6, 'filtered': 2, 'kept': 70}


def _hashes(directory):
  return {os.path.relpath(os.path.join(root, name), directory): shards.sha256_file(os.path.join(root, name))
          for root, _, names in os.walk(directory) for name in names}


def _same_output(local, beam):
  """Every file byte-identical, manifest.json apart from the recorded command; returns the beam manifest."""
  local_files, beam_files = _hashes(local), _hashes(beam)
  assert sorted(local_files) == sorted(beam_files)
  assert {k: v for k, v in local_files.items() if k != 'manifest.json'} == {
      k: v for k, v in beam_files.items() if k != 'manifest.json'}
  manifests = []
  for directory in (local, beam):
    with open(os.path.join(directory, 'manifest.json'), encoding='utf-8') as f:
      manifests.append(json.load(f))
  commands = [m.pop('command') for m in manifests]
  assert manifests[0] == manifests[1]
  return {**manifests[1], 'command': commands[1]}


@needs_beam
def test_beam_with_two_workers_writes_the_in_process_bytes(tmp_path, capsys):
  src, counts = _corpus(tmp_path / 'src')
  flags = ['--source', src, '--train-tokenizer', '--vocab-size', '300', '--validation-fraction', '0.2',
           '--shard-max-tokens', '400', '--row-group-size', '4', '--min-chars', '2', '--seed', '3']
  assert cli.main(['prepare', '--out', str(tmp_path / 'local'), *flags]) == 0
  assert cli.main(['prepare', '--out', str(tmp_path / 'beam'), '--runner', 'beam', '--direct_num_workers', '2',
                   *flags]) == 0
  # Every pair of the 3 files shares a document, so on 2 processes some duplicates cross workers.
  assert 'Beam read 3 files in 2 worker processes.' in capsys.readouterr().out
  manifest = _same_output(tmp_path / 'local', tmp_path / 'beam')
  assert '--runner beam --direct_num_workers 2' in manifest['command']
  assert manifest['documents'] == counts
  assert manifest['splits']['validation']['documents'] == round(0.2 * 70)
  assert len(manifest['splits']['train']['shards']) > 2
  assert sorted(os.listdir(tmp_path)) == ['beam', 'local', 'src']  # no OUT.tmp-* left behind


@needs_beam
def test_a_given_tokenizer_and_no_validation_agree_too(tmp_path):
  src, _ = _corpus(tmp_path / 'src')
  prepare.prepare(prepare.PrepareConfig(source=src, train_tokenizer=True, vocab_size=300), str(tmp_path / 'bpe'))
  cfg = prepare.PrepareConfig(source=src, tokenizer=str(tmp_path / 'bpe'), validation_fraction=0,
                              shard_max_tokens=300)
  prepare.prepare(cfg, str(tmp_path / 'local'))
  report = {}
  data_beam.prepare(cfg, str(tmp_path / 'beam'), num_workers=2, report=report)
  manifest = _same_output(tmp_path / 'local', tmp_path / 'beam')
  assert manifest['splits']['validation'] == {'documents': 0, 'tokens': 0, 'shards': []}
  assert manifest['tokenizer']['trained'] is False and len(set(report['readers'])) == 2


@needs_beam
@pytest.mark.parametrize('fmt', ['chat', 'preference'])
def test_chat_and_preference_data_agree_too(tmp_path, fmt):
  docs = _documents(24, seed=4)
  rows = []
  for i in range(24):
    if fmt == 'chat':
      rows.append({'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': docs[i]},
                                {'role': 'assistant', 'content': docs[(i + 1) % 24]}]})
    else:
      prompt = docs[i] if i % 2 else [{'role': 'user', 'content': docs[i]}]
      rows.append({'prompt': prompt, 'chosen': docs[(i + 1) % 24], 'rejected': docs[(i + 5) % 24]})
  os.makedirs(tmp_path / 'src')
  for name, part in (('a.jsonl', rows[:14]), ('b.jsonl', rows[14:] + rows[2:4])):  # two rows in both files
    with open(tmp_path / 'src' / name, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in part)
  cfg = prepare.PrepareConfig(source=str(tmp_path / 'src' / '*.jsonl'), format=fmt, train_tokenizer=True,
                              vocab_size=300, validation_fraction=0.2, shard_max_tokens=500)
  prepare.prepare(cfg, str(tmp_path / 'local'))
  data_beam.prepare(cfg, str(tmp_path / 'beam'), num_workers=2)
  manifest = _same_output(tmp_path / 'local', tmp_path / 'beam')
  assert manifest['documents']['duplicates'] == 2 and manifest['documents']['kept'] == 24
  assert ('chat' in manifest) and (fmt != 'preference' or manifest['preference']['pairs'] == {
      'train': 24 - round(0.2 * 24), 'validation': round(0.2 * 24)})


@needs_beam
@pytest.mark.parametrize('case', ['not utf-8', 'empty corpus'])
def test_bad_input_names_the_problem_exits_2_and_leaves_nothing(tmp_path, capsys, case):
  """A worker's error (a file that is not UTF-8) and the driver's (nothing left after the filters)."""
  src = tmp_path / 'src'
  src.mkdir()
  (src / 'good.txt').write_text('fine text')
  if case == 'not utf-8':
    (src / 'latin1.txt').write_bytes('ok\nna\xefve'.encode('latin-1'))
  expected = ('latin1.txt:2: not valid UTF-8' if case == 'not utf-8' else
              "empty corpus: 1 documents read from '" + str(src) + "', 0 duplicates, 1 outside --min-chars 50")
  code = cli.main(['prepare', '--source', str(src), '--out', str(tmp_path / 'out'), '--train-tokenizer',
                   '--min-chars', '50' if case == 'empty corpus' else '1', '--runner', 'beam',
                   '--direct_num_workers', '2'])
  err = capsys.readouterr().err
  assert code == 2 and 'stoker prepare: error: ' in err and expected in err
  assert sorted(os.listdir(tmp_path)) == ['src']


@needs_beam
def test_buckets_in_and_out_and_a_tokenizer_sample(tmp_path, monkeypatch):
  """--source and --out in a GCS emulator's bucket, the BPE trained on --tokenizer-sample 25 documents: the
  shards and manifest of the local in-process run."""
  from tests.storage import servers  # pylint: disable=g-import-not-at-top
  import storage  # pylint: disable=g-import-not-at-top
  src, _ = _corpus(tmp_path / 'src')
  process, url = servers.start('gcs', str(tmp_path / 'gcs.log'))
  try:
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', url)  # the workers inherit it
    servers.make_bucket('gs', url, 'corpus')
    for name in sorted(os.listdir(tmp_path / 'src')):
      storage.put_file(str(tmp_path / 'src' / name), f'gs://corpus/src/{name}')
    kwargs = dict(train_tokenizer=True, vocab_size=300, tokenizer_sample=25, shard_max_tokens=400)
    local = prepare.prepare(prepare.PrepareConfig(source=os.path.dirname(src), **kwargs), str(tmp_path / 'local'))
    in_bucket = data_beam.prepare(prepare.PrepareConfig(source='gs://corpus/src', **kwargs), 'gs://corpus/data',
                                  num_workers=2)
    for split in prepare.SPLITS:
      for entry in in_bucket['splits'][split]['shards']:
        data = storage.read_bytes(f'gs://corpus/data/{entry["path"]}')
        assert hashlib.sha256(data).hexdigest() == entry['sha256'] == shards.sha256_file(
            str(tmp_path / 'local' / entry['path']))
    assert json.loads(storage.read_text('gs://corpus/data/manifest.json')) == in_bucket
    for manifest in (local, in_bucket):
      del manifest['command'], manifest['source']  # the paths differ
    assert local == in_bucket and in_bucket['tokenizer']['sample']['documents'] == 25
    assert not os.path.exists('gs:') and not os.path.exists(tmp_path / 'gs:')
  finally:
    process.kill()
    process.wait()
  with pytest.raises(ValueError, match='a bucket output is staged on this machine, which FlinkRunner workers'):
    data_beam.prepare(prepare.PrepareConfig(source=src, train_tokenizer=True), 'gs://corpus/other',
                      beam_options='--runner=FlinkRunner')


def test_tokenizer_sample_is_the_cap_first_by_salted_hash_in_document_order(tmp_path):
  """In process (no Beam needed): the BPE is the one trained on the sample picked by hand with hashlib."""
  docs = _documents(40)
  os.makedirs(tmp_path / 'src')
  for i, doc in enumerate(docs):
    (tmp_path / 'src' / f'{i:02d}.txt').write_text(doc, encoding='utf-8')
  manifest = prepare.prepare(prepare.PrepareConfig(source=str(tmp_path / 'src'), train_tokenizer=True,
                                                   vocab_size=280, tokenizer_sample=12, seed=5,
                                                   validation_fraction=0.25), str(tmp_path / 'out'))
  digest = [hashlib.sha256(prepare.clean(d).encode()).digest() for d in docs]
  seed = (5).to_bytes(8, 'little', signed=True)
  by_split = sorted(range(40), key=lambda i: hashlib.sha256(seed + digest[i]).digest())
  train = sorted(by_split[10:])  # round(0.25 * 40) go to validation
  sample = sorted(sorted(train, key=lambda i: hashlib.sha256(b'tokenizer' + seed + digest[i]).digest())[:12])
  expected = tok.train_bpe([prepare.clean(docs[i]) for i in sample], 280).to_str(pretty=True)
  with open(tmp_path / 'out' / 'tokenizer.json', encoding='utf-8') as f:
    assert f.read() == expected
  assert manifest['tokenizer']['sample']['documents'] == 12
  with pytest.raises(ValueError, match='--tokenizer-sample picks the documents a BPE is trained on'):
    prepare.PrepareConfig(tokenizer=str(tmp_path / 'out'), tokenizer_sample=5)


@needs_beam
def test_largest_of_smallest_combine_against_sorting():
  rng = random.Random(1)
  keys = [rng.randbytes(8) for _ in range(200)]
  fn = data_beam._LargestOfSmallest()  # pylint: disable=protected-access
  for k in (0, 1, 7, 199, 200, 500):
    parts = [fn.create_accumulator(k) for _ in range(3)]
    for i, key in enumerate(keys):
      parts[i % 3] = fn.add_input(parts[i % 3], key, k)
    expected = sorted(keys)[min(k, 200) - 1] if k else None
    assert fn.extract_output(fn.merge_accumulators(parts, k), k) == expected


@needs_beam
def test_beam_options_pass_through_and_typos_are_refused():
  options = data_beam.pipeline_options(3, '').get_all_options()
  assert (options['runner'], options['direct_running_mode'], options['direct_num_workers']) == (
      'DirectRunner', 'multi_processing', 3)
  options = data_beam.pipeline_options(0, '--runner=FlinkRunner --flink_master=host:8081').get_all_options()
  assert (options['runner'], options['flink_master'], options['direct_num_workers']) == ('FlinkRunner', 'host:8081', 1)
  with pytest.raises(ValueError, match='--beam_options: unknown Beam option.s. direct_num_wrokers: check the'):
    data_beam.pipeline_options(2, '--direct_num_wrokers=3')


def test_without_beam_the_error_says_how_to_install_it(tmp_path, monkeypatch):
  monkeypatch.setattr(data_beam, 'beam', None)
  code = cli.main(['prepare', '--source', str(tmp_path), '--out', str(tmp_path / 'out'), '--train-tokenizer',
                   '--runner', 'beam'])
  assert code == 2 and not os.path.exists(tmp_path / 'out')
  with pytest.raises(ValueError, match=r"--runner beam needs Apache Beam: pip install -e '\.\[beam\]'"):
    data_beam.prepare(prepare.PrepareConfig(source=str(tmp_path), train_tokenizer=True), str(tmp_path / 'out'))
