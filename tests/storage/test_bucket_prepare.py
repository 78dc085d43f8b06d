"""`stoker prepare` with everything in a bucket (--source objects, --tokenizer, --out) writes what it writes
from the same files on local disk: the same shards byte for byte and the same manifest, apart from the paths
it records; and a glob, a prefix and a single object all name the corpus."""

from __future__ import annotations

import json
import os

import pytest

import storage
from data import prepare, source
from tests.storage.conftest import new_bucket, use_server

DOCS = [{'text': f'document {i}: ' + ' '.join(f'w{(i * 7 + j) % 50}' for j in range(40 + i))} for i in range(60)]


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_bucket_in_and_out_equal_local(scheme, endpoints, tmp_path, monkeypatch):
  use_server(monkeypatch, scheme, endpoints[scheme])
  bucket = new_bucket(scheme, endpoints[scheme])
  local_corpus = tmp_path / 'corpus'
  local_corpus.mkdir()
  for f in range(3):
    text = ''.join(json.dumps(d) + '\n' for d in DOCS[f::3])
    (local_corpus / f'part-{f}.jsonl').write_text(text)
    storage.write_text(f'{bucket}/corpus/part-{f}.jsonl', text)
  prepare.prepare(prepare.PrepareConfig(source=str(local_corpus), train_tokenizer=True, vocab_size=300,
                                        validation_fraction=0.2), str(tmp_path / 'tok'))  # a tokenizer.json
  storage.put_file(str(tmp_path / 'tok' / 'tokenizer.json'), f'{bucket}/tok/tokenizer.json')

  def run(pattern, tok, out):
    return prepare.prepare(prepare.PrepareConfig(source=pattern, tokenizer=tok, validation_fraction=0.2,
                                                 row_group_size=8, shard_max_tokens=800), out)

  local = run(str(local_corpus), str(tmp_path / 'tok' / 'tokenizer.json'), str(tmp_path / 'out'))
  for pattern in (f'{bucket}/corpus/*.jsonl', f'{bucket}/corpus'):
    out = f'{bucket}/out-{len(pattern)}'
    remote = run(pattern, f'{bucket}/tok', out)
    for key in ('splits', 'documents', 'tokenizer', 'eos_id'):
      assert remote[key] == local[key], key
    for split in remote['splits'].values():
      for shard in split['shards']:
        assert storage.read_bytes(f'{out}/{shard["path"]}') == (tmp_path / 'out' / shard['path']).read_bytes()
    assert json.loads(storage.read_text(f'{out}/manifest.json')) == remote
  assert len(remote['splits']['train']['shards']) > 2
  # The pipeline's reader over the bucket (shards checked concurrently, row groups by ranged reads) gives
  # every document the local reader gives.
  remote_docs, local_docs = source.open_split(out, 'train'), source.open_split(str(tmp_path / 'out'), 'train')
  assert len(remote_docs) == len(local_docs) == local['splits']['train']['documents']
  for i in range(len(local_docs)):
    assert remote_docs[i].tolist() == local_docs[i].tolist()
  one = run(f'{bucket}/corpus/part-0.jsonl', f'{bucket}/tok/tokenizer.json', f'{bucket}/one')
  assert one['documents']['read'] == len(DOCS[0::3])
  assert not os.path.exists('gs:') and not os.path.exists('s3:')
