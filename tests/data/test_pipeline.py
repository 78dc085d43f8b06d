"""The Grain pipeline (data/pipeline.py, source.py, packing.py, checkpoint.py) on shards written here.

The shards follow `stoker prepare`'s contract (manifest.json; <split>/shard-*.parquet with tokens
list<int32> and doc_id int64, zstd, row groups of 64 rows). They are written here with pyarrow, so
these tests do not depend on data/prepare.py. Every token is 1 + doc * K + offset: each token names
its document and offset, and 0 (padding) never occurs in a document.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import source as source_lib
from data.checkpoint import PipelineCheckpointHandler, PipelineRestore, PipelineSave
from data.packing import FirstFitPacker
from data.pipeline import PipelineIterator, make_iterator, merge_states
from data.source import ShardError, open_split
from data.synthetic import SyntheticData

K = 128  # token = 1 + doc * K + offset: documents are shorter than K
T, B = 16, 8  # sequence length and global batch of the tests
SHARDS = {'train': [200, 150, 90], 'validation': [70]}
ROW_GROUP = 64


def write_prepared(root: str, shards: dict[str, list[int]], seed: int = 0) -> dict[int, np.ndarray]:
  """A prepared data directory; returns {doc_id: tokens}. 15% of documents are longer than T + 1."""
  rng = np.random.default_rng(seed)
  docs, splits, doc = {}, {}, 0
  for split, sizes in shards.items():
    os.makedirs(os.path.join(root, split))
    entries = []
    for s, n in enumerate(sizes):
      lengths = np.where(rng.random(n) < 0.15, rng.integers(T + 2, 100, n), rng.integers(1, T + 2, n))
      tokens = [(1 + (doc + i) * K + np.arange(m)).astype(np.int32) for i, m in enumerate(lengths)]
      docs.update({doc + i: t for i, t in enumerate(tokens)})
      table = pa.table({'tokens': pa.array(tokens, pa.list_(pa.int32())),
                        'doc_id': pa.array(np.arange(doc, doc + n), pa.int64())})
      doc += n
      rel = f'{split}/shard-{s:05d}-of-{len(sizes):05d}.parquet'
      pq.write_table(table, os.path.join(root, rel), row_group_size=ROW_GROUP, compression='zstd')
      with open(os.path.join(root, rel), 'rb') as f:
        sha = hashlib.sha256(f.read()).hexdigest()
      entries.append({'path': rel, 'rows': n, 'tokens': int(lengths.sum()),
                      'row_groups': -(-n // ROW_GROUP), 'sha256': sha})
    splits[split] = {'documents': sum(e['rows'] for e in entries),
                     'tokens': sum(e['tokens'] for e in entries), 'shards': entries}
  manifest = {'format': 'stoker-tokens-v1', 'eos_id': 0,
              'tokenizer': {'vocab_size': 1 + doc * K}, 'splits': splits}
  with open(os.path.join(root, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)
  return docs


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('prepared'))
  return root, write_prepared(root, SHARDS)


def split_tokens(docs, split: str) -> collections.Counter:
  first = 0 if split == 'train' else sum(SHARDS['train'])
  ids = range(first, first + sum(SHARDS[split]))
  return collections.Counter(int(t) for i in ids for t in docs[i])


def delivered_tokens(batches) -> collections.Counter:
  """Every document token in the batches: the rows are inputs plus the last target."""
  out = collections.Counter()
  for b in batches:
    rows = np.concatenate([b['inputs'], b['targets'][:, -1:]], axis=1)
    out.update(int(t) for t in rows[rows != 0])
  return out


def take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def drain(it) -> list[dict]:
  return list(it)


def iterator(data_dir, split='train', n=1, p=0, **kwargs) -> PipelineIterator:
  return make_iterator(data_dir, split, seq_len=T, global_batch_size=B, seed=7, process_index=p,
                       process_count=n, **kwargs)


def assert_same(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for i, (x, y) in enumerate(zip(a, b)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=f'batch {i}, {k}')


def concat(per_process: list[list[dict]]) -> list[dict]:
  """Global batches from the processes' batches, process 0's rows first."""
  return [{k: np.concatenate([b[k] for b in step]) for k in step[0]} for step in zip(*per_process)]


# ----------------------------------------------------------------------------- source


def test_source_reads_each_document_by_row_group(prepared, monkeypatch):
  data_dir, docs = prepared
  reads = []
  original = pq.ParquetFile.read_row_group
  monkeypatch.setattr(pq.ParquetFile, 'read_row_group',
                      lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
  monkeypatch.setattr(pq, 'read_table', None)  # a whole-file read would fail
  src = open_split(data_dir, 'train', verify_checksums=True)
  assert isinstance(src, grain.sources.RandomAccessDataSource)
  assert len(src) == sum(SHARDS['train'])
  for i in range(len(src)):
    np.testing.assert_array_equal(src[i], docs[i])
  assert len(reads) == sum(-(-n // ROW_GROUP) for n in SHARDS['train'])  # each group once, in order
  with pytest.raises(IndexError):
    src[len(src)]


# ----------------------------------------------------------------------------- packing


def test_first_fit_packer_by_hand():
  packer = FirstFitPacker(row_len=8, bins=2)
  for ref, length in enumerate([5, 4, 3, 10]):
    packer.add(ref, length)
  packer.flush()
  # 0 opens row A; 1 does not fit A: row B; 2 fills A; 3 is cut into 8 (a row) + 2 (into B).
  assert list(packer.ready) == [[(0, 0, 5), (2, 0, 3)], [(3, 0, 8)], [(1, 0, 4), (3, 8, 2)]]
  packer = FirstFitPacker(row_len=8, bins=2)
  for ref, length in enumerate([6, 3, 7]):
    packer.add(ref, length)  # 2 fits no open row and both bins are used: the fullest (0) closes
  assert list(packer.ready) == [[(0, 0, 6)]]
  packer.flush()
  assert list(packer.ready) == [[(0, 0, 6)], [(1, 0, 3)], [(2, 0, 7)]]


def test_batches_have_the_synthetic_format(prepared):
  synthetic = SyntheticData(vocab_size=100, seq_len=T, batch_size=B // 2).batch(0)
  with iterator(prepared[0], n=2) as it:
    batch = next(it)
  assert batch.keys() == synthetic.keys()
  for k, v in synthetic.items():
    assert (batch[k].shape, batch[k].dtype) == (v.shape, v.dtype), k


def test_packing_keeps_segments_in_rows_and_covers_every_token_once(prepared):
  data_dir, docs = prepared
  per_process = []
  for p in range(2):
    with iterator(data_dir, n=2, p=p, num_epochs=1) as it:
      per_process.append(drain(it))
  with iterator(data_dir, num_epochs=1) as it:
    whole = drain(it)
    used = np.mean([b['segment_ids'] != 0 for b in whole])
    assert it.packing_efficiency == pytest.approx(used) and used > 0.8
  assert_same(concat(per_process), whole)  # both processes stop at the global end
  batches = per_process[0] + per_process[1]
  assert delivered_tokens(batches) == split_tokens(docs, 'train')  # each token exactly once
  for b in batches:
    for tok, tgt, seg, pos, mask in zip(b['inputs'], b['targets'], b['segment_ids'],
                                        b['positions'], b['loss_mask']):
      used = seg != 0
      assert used[:used.sum()].all()  # padding only at the end of a row
      starts = np.flatnonzero(np.diff(seg, prepend=-1))
      ids = seg[starts][seg[starts] != 0]
      np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # 1, 2, ...: contiguous runs
      assert pos[0] == 0  # every row starts a segment: none crosses a row boundary
      for a, z in zip(starts, list(starts[1:]) + [T]):
        if seg[a]:
          np.testing.assert_array_equal(pos[a:z], np.arange(z - a))  # restart per segment
          np.testing.assert_array_equal(tok[a:z], tok[a] + np.arange(z - a))  # one document, in order
      # The loss counts a target only where it is the next token of the input's document.
      np.testing.assert_array_equal(mask, (used & (tgt == tok + 1)).astype(np.float32))


def test_validation_covers_every_token_once_and_pads_only_the_last_batch(prepared):
  data_dir, docs = prepared
  with iterator(data_dir, 'validation', num_epochs=1, shuffle=False) as it:
    batches = drain(it)
    with pytest.raises(StopIteration):
      next(it)
  assert delivered_tokens(batches) == split_tokens(docs, 'validation')
  assert all((b['segment_ids'][:, 0] != 0).all() for b in batches[:-1])  # no empty row before
  last = batches[-1]
  assert (last['segment_ids'][:, 0] == 0).any()
  assert (last['loss_mask'][last['segment_ids'] == 0] == 0).all()
  per_process = []
  for p in range(2):
    with iterator(data_dir, 'validation', n=2, p=p, num_epochs=1, shuffle=False) as it:
      per_process.append(drain(it))
  assert_same(concat(per_process), batches)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize('stop', [0, 5])
def test_resume_gives_the_batches_of_an_uninterrupted_run(prepared, stop):
  with iterator(prepared[0]) as it:
    reference = take(it, stop + 6)
  with iterator(prepared[0]) as it:
    take(it, stop)
    state = json.loads(json.dumps(it.get_state()))
  with iterator(prepared[0]) as it:
    it.set_state(state)
    assert it.step == stop
    assert_same(take(it, 6), reference[stop:])


@pytest.mark.multiprocess
def test_orbax_round_trip_with_worker_processes(prepared, tmp_path):
  data_dir = prepared[0]
  with iterator(data_dir) as it:
    reference = take(it, 7)
  with iterator(data_dir, worker_count=2) as it, ocp.CheckpointManager(tmp_path) as mngr:
    assert_same(take(it, 3), reference[:3])  # worker processes change nothing
    mngr.save(3, args=ocp.args.Composite(data=PipelineSave(it)))
    mngr.wait_until_finished()
    take(it, 2)  # consumed after the save: must not leak into the restore
  with iterator(data_dir, worker_count=2) as it, ocp.CheckpointManager(tmp_path) as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=PipelineRestore(it)))
    assert_same(take(it, 4), reference[3:])


@pytest.mark.parametrize('streams', [B, 1])  # a stream per row; one stream that processes share
@pytest.mark.parametrize('before,after', [(2, 1), (1, 2)])
def test_resharding_continues_the_global_order_exactly_once(prepared, tmp_path, before, after,
                                                            streams):
  data_dir, docs = prepared
  with iterator(data_dir, num_epochs=1, streams=streams) as it:
    reference = drain(it)
  handler = PipelineCheckpointHandler()
  old = [iterator(data_dir, n=before, p=p, num_epochs=1, streams=streams) for p in range(before)]
  first = [take(it, 4) for it in old]
  assert_same(concat(first), reference[:4])
  for it in old:
    handler.save(tmp_path, args=PipelineSave(it))
    it.close()
  rest = []
  for p in range(after):
    with iterator(data_dir, n=after, p=p, num_epochs=1, streams=streams) as it:
      handler.restore(tmp_path, args=PipelineRestore(it))
      rest.append(drain(it))
  assert_same(concat(rest), reference[4:])
  got = delivered_tokens([b for batches in first + rest for b in batches])
  assert got == split_tokens(docs, 'train')


def test_restore_refuses_other_settings_or_missing_streams(prepared):
  with iterator(prepared[0], n=2, p=0) as it:
    next(it)
    state = it.get_state()
  with make_iterator(prepared[0], 'train', seq_len=T, global_batch_size=B, seed=8,
                     process_index=0, process_count=2) as other, pytest.raises(ValueError, match='seed'):
    other.set_state(state)
  with iterator(prepared[0], n=2, p=1) as it, pytest.raises(ValueError, match='lacks streams'):
    it.set_state(state)  # process 0's streams only
  with pytest.raises(ValueError, match='state is missing'):
    merge_states([state])


# ----------------------------------------------------------------------------- corrupt data


def _damage(root: str, how: str) -> str:
  shard = os.path.join(root, 'train', 'shard-00001-of-00003.parquet')
  if how == 'truncated':
    with open(shard, 'r+b') as f:
      f.truncate(os.path.getsize(shard) - 100)
  elif how == 'missing':
    os.remove(shard)
  elif how == 'rows':
    with open(os.path.join(root, 'manifest.json')) as f:
      manifest = json.load(f)
    manifest['splits']['train']['shards'][1]['rows'] += 1
    with open(os.path.join(root, 'manifest.json'), 'w') as f:
      json.dump(manifest, f)
  else:  # 'page' or 'checksum': overwrite the page header of row group 1's tokens
    offset = pq.read_metadata(shard).row_group(1).column(0).data_page_offset
    with open(shard, 'r+b') as f:
      f.seek(offset)
      f.write(b'\xff' * 16)
  return shard


@pytest.mark.parametrize('how', ['truncated', 'missing', 'rows', 'checksum'])
def test_a_damaged_shard_fails_at_open_naming_the_file(prepared, tmp_path, how):
  root = str(tmp_path / 'data')
  shutil.copytree(prepared[0], root)
  shard = _damage(root, how)
  with pytest.raises(ShardError) as e:
    open_split(root, 'train', verify_checksums=how == 'checksum')
  assert shard in str(e.value) and 'stoker prepare' in str(e.value)


def test_a_corrupt_row_group_fails_when_read_naming_the_file(prepared, tmp_path):
  root = str(tmp_path / 'data')
  shutil.copytree(prepared[0], root)
  shard = _damage(root, 'page')
  src = open_split(root, 'train')  # the footer is intact: the cheap check passes
  first = SHARDS['train'][0] + ROW_GROUP  # first document of row group 1 of shard 1
  src[first - 1]
  with pytest.raises(ShardError) as e:
    src[first]
  assert shard in str(e.value) and 'row group 1' in str(e.value) and 'stoker prepare' in str(e.value)
  with pytest.raises(ShardError), iterator(root, num_epochs=1, shuffle=False) as it:
    drain(it)


def test_a_missing_manifest_says_to_run_prepare(tmp_path):
  with pytest.raises(ShardError, match='stoker prepare'):
    source_lib.read_manifest(str(tmp_path))
