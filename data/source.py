"""Random access to the documents of a prepared split: the Parquet shards `stoker prepare` writes.

On disk (format 'stoker-tokens-v1'): <data_dir>/manifest.json and <data_dir>/<split>/shard-*.parquet,
one row per document, column `tokens` list<int32> (EOS already appended), row groups of at most 256
rows, zstd. The manifest lists every shard with its rows, tokens, row groups and sha256.

`open_split` checks every shard cheaply (the file exists, its footer parses, its row and row-group
counts and `tokens` type match the manifest); `verify_checksums=True` also hashes every file.
Record i of the split is found through the manifest order and the row-group sizes in the footers,
and is read one row group at a time: `read_row_group(k, columns=['tokens'])`, never the whole file. A data_dir
in a bucket (gs://, s3://; storage/) is read the same way, by ranged reads, retried with backoff on transient errors.
Decoded row groups stay in a per-process LRU cache of `cache_bytes` (each grain worker has its
own). Under a global shuffle a document's row group is in the cache only if the cache holds a good
share of the split: a corpus much larger than the cache costs one row-group decode per document.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import storage
from data import shards

FORMAT, MANIFEST = shards.FORMAT, shards.MANIFEST


class ShardError(ValueError):
  """A manifest or shard does not match what `stoker prepare` wrote: missing, truncated or corrupt."""


def _redo(data_dir: str) -> str:
  return f'Re-run `stoker prepare` to rewrite {data_dir}.'


def read_manifest(data_dir: str) -> dict[str, Any]:
  """The manifest of a prepared data directory, checked for the fields the pipeline needs."""
  path = storage.join(data_dir, MANIFEST)
  try:
    manifest = json.loads(storage.read_text(path))
  except FileNotFoundError:
    raise ShardError(f'{path} does not exist: {data_dir} is not a prepared data directory. '
                     f'Run `stoker prepare` first.') from None
  except (OSError, json.JSONDecodeError) as e:
    raise ShardError(f'{path} cannot be read ({e}). {_redo(data_dir)}') from e
  if manifest.get('format') != FORMAT:
    raise ShardError(f'{path} has format {manifest.get("format")!r}, this pipeline reads {FORMAT!r}. '
                     f'{_redo(data_dir)}')
  for key in ('eos_id', 'tokenizer', 'splits'):
    if key not in manifest:
      raise ShardError(f'{path} lacks {key!r}. {_redo(data_dir)}')
  if manifest.get('output_format', 'parquet') != 'parquet':
    raise ShardError(f'{data_dir} holds {manifest["output_format"]} shards; this pipeline reads '
                     f'Parquet: run `stoker prepare` with --output-format parquet.')
  return manifest


class ParquetTokenSource:
  """The documents of one split as int32 token arrays, by global index (manifest order).

  A grain `RandomAccessDataSource` (`__len__`, `__getitem__`, picklable for worker processes:
  open files and the cache are per process and not pickled).
  """

  def __init__(self, data_dir: str, split: str, *, verify_checksums: bool = False,
               cache_bytes: int = 256 << 20):
    if cache_bytes < 0:
      raise ValueError(f'cache_bytes must be >= 0, got {cache_bytes}.')
    manifest = read_manifest(data_dir)
    if split not in manifest['splits']:
      raise ShardError(f'{storage.join(data_dir, MANIFEST)} has no split {split!r} (it has '
                       f'{sorted(manifest["splits"])}).')
    entry = manifest['splits'][split]
    if not entry.get('documents'):
      raise ShardError(f'split {split!r} of {data_dir} has no documents.')
    self.data_dir, self.split = data_dir, split
    self.eos_id = int(manifest['eos_id'])
    self.vocab_size = manifest['tokenizer'].get('vocab_size')
    # Chat data stores the tokens the loss skips as -1 - id (data/chat.py).
    self.low = -self.vocab_size if 'chat' in manifest and self.vocab_size else 0
    self.tokens = int(entry.get('tokens', 0))
    self.fingerprint = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
    self._cache_bytes = cache_bytes
    starts, shard_of, group_of = [], [], []
    row = 0
    self._paths = [storage.join(data_dir, shard['path']) for shard in entry['shards']]
    check = functools.partial(self._check_shard, verify_checksums=verify_checksums)
    if storage.is_bucket(data_dir) and len(self._paths) > 1:
      # Each check is a few requests (a footer's ranged reads): overlapped, not one round trip after another.
      with concurrent.futures.ThreadPoolExecutor(min(32, len(self._paths))) as pool:
        checked = list(pool.map(check, self._paths, entry['shards']))
    else:
      checked = list(map(check, self._paths, entry['shards']))
    for s, metadata in enumerate(checked):
      for g in range(metadata.num_row_groups):
        starts.append(row)
        shard_of.append(s)
        group_of.append(g)
        row += metadata.row_group(g).num_rows
    if row != entry['documents']:
      raise ShardError(f'{data_dir}/{split}: the shards hold {row} documents, the manifest says '
                       f'{entry["documents"]}. {_redo(data_dir)}')
    self._length = row
    self._starts = np.array(starts + [row], np.int64)  # first row of each row group, then the end
    self._shard_of = np.array(shard_of, np.int64)
    self._group_of = np.array(group_of, np.int64)
    self._reset()

  def _check_shard(self, path: str, shard: dict, verify_checksums: bool) -> pq.FileMetaData:
    if not storage.isfile(path):
      raise ShardError(f'{path} is missing. {_redo(self.data_dir)}')
    try:
      with _parquet(path) as parquet:
        metadata, schema = parquet.metadata, parquet.schema_arrow
    except (OSError, pa.ArrowException) as e:
      raise ShardError(f'{path} is not a readable Parquet file ({e}); it is truncated or corrupt. '
                       f'{_redo(self.data_dir)}') from e
    problems = []
    if metadata.num_rows != shard['rows']:
      problems.append(f'{metadata.num_rows} rows, the manifest says {shard["rows"]}')
    if metadata.num_row_groups != shard['row_groups']:
      problems.append(f'{metadata.num_row_groups} row groups, the manifest says {shard["row_groups"]}')
    field = schema.field('tokens') if 'tokens' in schema.names else None
    if field is None or not (pa.types.is_list(field.type) or pa.types.is_large_list(field.type)) \
        or field.type.value_type != pa.int32():
      problems.append(f'column tokens is {field.type if field else "absent"}, expected list<int32>')
    if problems:
      raise ShardError(f'{path}: {"; ".join(problems)}. {_redo(self.data_dir)}')
    if verify_checksums and shards.sha256_file(path) != shard['sha256']:
      raise ShardError(f'{path}: sha256 differs from the manifest; the file is corrupt or was '
                       f'changed. {_redo(self.data_dir)}')
    return metadata

  def _reset(self) -> None:
    self._files: collections.OrderedDict[int, pq.ParquetFile] = collections.OrderedDict()
    self._cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = (
        collections.OrderedDict())
    self._cached_bytes = 0

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_files'], state['_cache']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset()

  def __len__(self) -> int:
    return self._length

  def __repr__(self) -> str:
    return (f'ParquetTokenSource({self.data_dir!r}, {self.split!r}, documents={self._length}, '
            f'fingerprint={self.fingerprint})')

  def __getitem__(self, index: int) -> np.ndarray:
    """Document `index` (0 <= index < len): its token ids, int32, EOS last."""
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f'document {index} out of range [0, {self._length}).')
    k = int(np.searchsorted(self._starts, index, side='right')) - 1
    offsets, values = self._row_group(k)
    r = index - int(self._starts[k])
    return values[offsets[r]:offsets[r + 1]].copy()

  def _row_group(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    if k in self._cache:
      self._cache.move_to_end(k)
      return self._cache[k]
    s, g = int(self._shard_of[k]), int(self._group_of[k])
    path, rows = self._paths[s], int(self._starts[k + 1] - self._starts[k])
    try:
      column = storage.with_retries(lambda: self._file(s).read_row_group(g, columns=['tokens']),
                                    f'reading row group {g} of {path}').column('tokens')
      array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
      offsets = array.offsets.to_numpy().astype(np.int64)
      values = array.values.to_numpy()
    except (OSError, pa.ArrowException) as e:
      raise ShardError(f'{path}: row group {g} cannot be read ({e}); the shard is truncated or '
                       f'corrupt. {_redo(self.data_dir)}') from e
    bad = None
    if len(array) != rows or array.null_count:
      bad = f'{len(array)} rows ({array.null_count} null), the footer says {rows}'
    elif values.size and (values.min() < self.low or (self.vocab_size and values.max() >= self.vocab_size)):
      bad = (f'token ids span [{values.min()}, {values.max()}], outside the vocabulary '
             f'[{self.low}, {self.vocab_size})')
    if bad:
      raise ShardError(f'{path}: row group {g} has {bad}. {_redo(self.data_dir)}')
    self._cache[k] = (offsets, values)
    self._cached_bytes += offsets.nbytes + values.nbytes
    while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
      old = self._cache.popitem(last=False)[1]
      self._cached_bytes -= old[0].nbytes + old[1].nbytes
    return offsets, values

  def _file(self, s: int) -> pq.ParquetFile:
    if s in self._files:
      self._files.move_to_end(s)
    else:
      self._files[s] = _parquet(self._paths[s])
      if len(self._files) > 8:  # bound open file handles for corpora with many shards
        self._files.popitem(last=False)[1].close()
    return self._files[s]


def _parquet(path: str) -> pq.ParquetFile:
  """`path` opened for row-group reads: in a bucket, each read is a ranged GET (the footer, then one row
  group's column chunks), never a download of the whole shard."""
  if not storage.is_bucket(path):
    return pq.ParquetFile(path)
  return pq.ParquetFile(storage.with_retries(lambda: storage.open(path, 'rb'), f'opening {path}'))


def open_split(data_dir: str, split: str, **kwargs) -> ParquetTokenSource:
  """The documents of `split` in a `stoker prepare` directory; see ParquetTokenSource."""
  return ParquetTokenSource(data_dir, split, **kwargs)
