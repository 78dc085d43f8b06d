"""Token shards: a split's documents, in order, in files of at most `max_tokens` tokens.

Parquet (primary): one row per document, columns `tokens` (list<int32>, EOS included) and `doc_id` (int64),
zstd, row groups of at most `row_group_size` rows: what the training pipeline reads (data/source.py). Writer
options are pinned so that the same input gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tqdm

import storage

FORMAT = 'stoker-tokens-v1'  # manifest.json 'format'
MANIFEST = 'manifest.json'
OUTPUT_FORMATS = ('parquet',)
PARQUET_OPTIONS = dict(compression='zstd', compression_level=3, use_dictionary=False, write_statistics=True,
                       version='2.6', data_page_version='1.0', store_schema=True)
SCHEMA = pa.schema([('tokens', pa.list_(pa.int32())), ('doc_id', pa.int64())])


def plan_shards(lengths: Sequence[int], max_tokens: int) -> list[tuple[int, int]]:
  """[start, end) document ranges, in order, each holding at most `max_tokens` tokens.

  A shard is closed before the document that would overflow it; a document longer than `max_tokens` (documents
  are never split) is a shard of its own.
  """
  ranges, start, tokens = [], 0, 0
  for i, n in enumerate(lengths):
    if i > start and tokens + n > max_tokens:
      ranges.append((start, i))
      start, tokens = i, 0
    tokens += n
  if len(lengths) > start:
    ranges.append((start, len(lengths)))
  return ranges


def write_split(directory: str, split: str, docs: Sequence[np.ndarray], doc_ids: Sequence[int], *,
                max_tokens: int, row_group_size: int, output_format: str) -> list[dict]:
  """Writes `docs` under `directory/split/` and returns the manifest entry of each shard (paths relative)."""
  if output_format not in OUTPUT_FORMATS:
    raise ValueError(f'unknown --output-format {output_format!r}: choose one of {", ".join(OUTPUT_FORMATS)}')
  os.makedirs(os.path.join(directory, split))
  ranges = plan_shards([len(d) for d in docs], max_tokens)
  return [write_shard(directory, split, index, len(ranges), docs[start:end], doc_ids[start:end], row_group_size)
          for index, (start, end) in enumerate(tqdm.tqdm(ranges, desc=f'write {split}', unit='shard',
                                                         disable=not sys.stderr.isatty()))]


def write_shard(directory: str, split: str, index: int, num_shards: int, docs: Sequence[np.ndarray],
                doc_ids: Sequence[int], row_group_size: int) -> dict:
  """Writes shard `index` of `num_shards` of a split (its directory exists); returns its manifest entry."""
  rel = f'{split}/shard-{index:05d}-of-{num_shards:05d}.parquet'
  path = os.path.join(directory, rel)
  entry = {'path': rel, 'rows': len(docs), 'tokens': int(sum(len(d) for d in docs))}
  entry['row_groups'] = _write_parquet(path, docs, doc_ids, row_group_size)
  entry['sha256'] = sha256_file(path)
  return entry


def _write_parquet(path: str, docs: Sequence[np.ndarray], doc_ids: Sequence[int], row_group_size: int) -> int:
  offsets = np.zeros(len(docs) + 1, np.int64)
  np.cumsum([len(d) for d in docs], out=offsets[1:])
  if offsets[-1] >= 2**31:
    raise ValueError(f'{path}: {offsets[-1]} tokens in one shard overflow list<int32> offsets: '
                     f'lower --shard-max-tokens')
  tokens = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(np.concatenate(docs)))
  table = pa.Table.from_arrays([tokens, pa.array(np.asarray(doc_ids, np.int64))], schema=SCHEMA)
  pq.write_table(table, path, row_group_size=row_group_size, **PARQUET_OPTIONS)
  return pq.ParquetFile(path).metadata.num_row_groups


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with storage.open(path, 'rb') as f:  # local, or a bucket object read in 1 MiB ranges
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()
