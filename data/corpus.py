"""The raw corpus for `stoker prepare`: the running Python's standard library, or files by path or glob.

A source yields documents (one per text file, JSONL line, CSV row or Parquet row) in a fixed order, and a
description of what was read for the manifest. Every error names the file (and line, row or column) and the fix.

`stdlib`: every `*.py` file under `sysconfig.get_paths()['stdlib']`, test suites included (they are most of the
text), `site-packages`/`dist-packages` excluded, sorted by relative path; one document per file. Files that are
not UTF-8 (a handful of deliberately mis-encoded test fixtures) are skipped and listed in the manifest.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import platform
import sys
import sysconfig
from typing import Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import tqdm

import storage
from data import chat, preference

STDLIB = 'stdlib'
FORMATS = ('auto', 'text', 'jsonl', 'csv', 'parquet', 'chat', 'preference')
EXTENSIONS = {'.txt': 'text', '.md': 'text', '.jsonl': 'jsonl', '.csv': 'csv', '.parquet': 'parquet'}
_STDLIB_EXCLUDED_DIRS = {'site-packages', 'dist-packages', '__pycache__'}


def _progress(iterable, **kwargs):
  return tqdm.tqdm(iterable, disable=not sys.stderr.isatty(), **kwargs)


class SourceFile(NamedTuple):
  """One file of a source: `path` to open, `name` in the manifest's fingerprint, `format` its reader."""

  path: str
  name: str
  format: str  # a _READERS key, or STDLIB (UTF-8 text; a file that is not is skipped, not an error)


def read_source(source: str, fmt: str = 'auto', field: str = 'text',
                limit_files: int | None = None) -> tuple[list[str], dict]:
  """Reads every document of `source` ('stdlib', a file, a directory or a glob), in order.

  Returns the documents' texts and the manifest's description of the source.
  """
  texts, reads = [], []
  for file in _progress(source_files(source, fmt, limit_files), desc='read', unit='file'):
    file_texts, read = read_file(file, field)
    texts.extend(file_texts)
    reads.append(read)
  return texts, describe(source, fmt, field, limit_files, reads)


def source_files(source: str, fmt: str = 'auto', limit_files: int | None = None) -> list[SourceFile]:
  """The files of `source`, in reading order (the order of the documents)."""
  if fmt not in FORMATS:
    raise ValueError(f'unknown --format {fmt!r}: choose one of {", ".join(FORMATS)}')
  if source == STDLIB:
    root = sysconfig.get_paths()['stdlib']
    paths = []
    for directory, dirs, names in os.walk(root):
      dirs[:] = sorted(d for d in dirs if d not in _STDLIB_EXCLUDED_DIRS)
      paths += [os.path.relpath(os.path.join(directory, n), root) for n in names if n.endswith('.py')]
    if not paths:
      raise FileNotFoundError(f'no *.py files under the standard library at {root}: pass --source PATH instead')
    paths = sorted(p.replace(os.sep, '/') for p in paths)[:limit_files]
    return [SourceFile(os.path.join(root, rel), rel, STDLIB) for rel in paths]
  return [SourceFile(path, path, fmt if fmt != 'auto' else EXTENSIONS[os.path.splitext(path)[1].lower()])
          for path in _expand(source, fmt)[:limit_files]]


def read_file(file: SourceFile, field: str = 'text') -> tuple[list[str], dict]:
  """The documents of one file, and what `describe` needs of it: its name, size and sha256, or why it was
  skipped (a standard-library file that is not UTF-8)."""
  data = _read_bytes(file.path)
  read = {'name': file.name, 'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
  if file.format != STDLIB:
    return list(_READERS[file.format](file.path, data, field)), read
  try:
    return [data.decode('utf-8')], read
  except UnicodeDecodeError as e:
    return [], {'name': file.name, 'skipped': f'not UTF-8 (byte {e.start})'}


def describe(source: str, fmt: str, field: str, limit_files: int | None, reads: list[dict]) -> dict:
  """The manifest's description of a source from `read_file`'s records, in reading order.

  Its sha256 is over each file's name, size and sha256, so that files read in parallel give the same one.
  """
  digest, total_bytes = hashlib.sha256(), 0
  for read in reads:
    if 'skipped' not in read:
      total_bytes += read['bytes']
      digest.update(f'{read["name"]}\0{read["bytes"]}\0{read["sha256"]}\n'.encode())
  if source != STDLIB:
    return {'kind': 'files', 'pattern': source, 'format': fmt, 'field': field, 'files': len(reads),
            'bytes': total_bytes, 'sha256': digest.hexdigest()}
  skipped = [{'path': r['name'], 'reason': r['skipped']} for r in reads if 'skipped' in r]
  return {'kind': STDLIB, 'python': platform.python_version(), 'root': sysconfig.get_paths()['stdlib'],
          'limit_files': limit_files, 'files': len(reads) - len(skipped), 'bytes': total_bytes,
          'sha256': digest.hexdigest(), 'skipped': skipped}


def _expand(source: str, fmt: str) -> list[str]:
  """The files `source` names, sorted; a directory is searched recursively for the format's extensions."""
  wanted = tuple(e for e, f in EXTENSIONS.items() if fmt in ('auto', f))
  if storage.is_bucket(source):
    paths, what = _expand_bucket(source, wanted), f'--source {source!r} matched no {"/".join(wanted)} objects'
  elif os.path.isdir(source):
    paths = []
    for directory, dirs, names in os.walk(source):
      dirs[:] = sorted(dirs)
      paths += [os.path.join(directory, n) for n in names if n.lower().endswith(wanted)]
    what = f'no {"/".join(wanted)} files under directory {source!r}'
  elif glob.has_magic(source):
    paths = [p for p in glob.glob(source, recursive=True) if not os.path.isdir(p)]
    what = f'--source {source!r} matched no files'
  elif os.path.lexists(source):
    paths = [source]
    what = ''
  else:
    raise FileNotFoundError(f'--source {source!r}: no such file, directory or glob match '
                            f'(use --source stdlib for the built-in corpus)')
  if not paths:
    raise FileNotFoundError(f'{what}: check the path, or pass --format to choose the file type')
  paths.sort()
  if fmt == 'auto':
    for path in paths:
      if os.path.splitext(path)[1].lower() not in EXTENSIONS:
        raise ValueError(f'{path}: cannot tell the format from the extension: pass --format '
                         f'({", ".join(FORMATS[1:])})')
  return paths


def _expand_bucket(source: str, wanted: tuple[str, ...]) -> list[str]:
  """The objects a bucket --source names: a glob, an object, or every object of the format under a prefix."""
  scheme, bucket, _ = storage.split(source)
  storage.check(f'{scheme}://{bucket}')  # the bucket: a glob is no object to probe
  if glob.has_magic(source):
    return storage.glob(source)
  if storage.isfile(source):
    return [source]
  return [p for p in storage.glob(storage.join(source, '**')) if p.lower().endswith(wanted)]


def _read_bytes(path: str) -> bytes:
  try:
    if storage.is_bucket(path):
      return storage.with_retries(lambda: storage.read_bytes(path), f'reading {path}')
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise ValueError(f'cannot read {path}: {e.strerror or e}: fix the file or its permissions, '
                     f'or remove it from --source') from e


def _decode(path: str, data: bytes) -> str:
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b'\n') + 1
    raise ValueError(f'{path}:{line}: not valid UTF-8 (byte {e.start}): convert the file to UTF-8 '
                     f'(e.g. iconv -t UTF-8) or remove it from --source') from e


def _read_text(path: str, data: bytes, field: str) -> Iterator[str]:
  del field  # a text file is one document
  yield _decode(path, data)


def _read_jsonl(path: str, data: bytes, field: str) -> Iterator[str]:
  for where, record in _json_lines(path, data):
    if not isinstance(record, dict):
      raise ValueError(f'{where}: expected a JSON object per line, got {type(record).__name__}')
    if field not in record:
      raise ValueError(f'{where}: no field {field!r} (fields: {", ".join(map(repr, record)) or "none"}): '
                       f'choose one with --field')
    yield _as_text(record[field], f'{where}: field {field!r}')


def _json_lines(path: str, data: bytes) -> Iterator[tuple[str, dict]]:
  """('path:line', object) of each non-empty JSONL line."""
  for number, line in enumerate(_decode(path, data).split('\n'), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{number}: not valid JSON ({e.msg} at column {e.colno}): fix or remove the '
                       f'line') from e
    yield f'{path}:{number}', record


def _read_chat(path: str, data: bytes, field: str) -> Iterator[str]:
  """JSONL of conversations (OpenAI-style `messages`; --field names another key): each one as its
  canonical JSON text, the document that cleaning, deduplication and splitting see."""
  field = 'messages' if field == 'text' else field
  for where, record in _json_lines(path, data):
    if not isinstance(record, dict) or field not in record:
      raise ValueError(f'{where}: expected a JSON object with a {field!r} list of messages')
    messages = chat.check_conversation(record[field], where)
    yield json.dumps(messages, ensure_ascii=False, sort_keys=True)


def _read_preference(path: str, data: bytes, field: str) -> Iterator[str]:
  """JSONL of preference pairs (data/preference.py), each as its canonical JSON text."""
  del field
  for where, record in _json_lines(path, data):
    yield preference.rows_text(preference.check_row(record, where))


def _read_csv(path: str, data: bytes, field: str) -> Iterator[str]:
  csv.field_size_limit(2**31 - 1)  # documents are long; the default limit is 128 KiB per field
  reader = csv.DictReader(_decode(path, data).splitlines(keepends=True))
  try:
    if reader.fieldnames is None:
      raise ValueError(f'{path}: empty CSV file (no header row): remove it from --source')
    if field not in reader.fieldnames:
      raise ValueError(f'{path}: no column {field!r} (columns: {", ".join(map(repr, reader.fieldnames))}): '
                       f'choose one with --column')
    for row in reader:
      yield _as_text(row[field], f'{path}:{reader.line_num}: column {field!r}')
  except csv.Error as e:
    raise ValueError(f'{path}:{reader.line_num}: malformed CSV ({e}): fix or remove the line') from e


def _read_parquet(path: str, data: bytes, field: str) -> Iterator[str]:
  try:
    parquet = pq.ParquetFile(pa.BufferReader(data))
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f'{path}: not a readable Parquet file ({e}): re-export it or remove it from --source') from e
  names = parquet.schema_arrow.names
  if field not in names:
    raise ValueError(f'{path}: no column {field!r} (columns: {", ".join(map(repr, names))}): '
                     f'choose one with --column')
  column_type = parquet.schema_arrow.field(field).type
  if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
    raise ValueError(f'{path}: column {field!r} has type {column_type}, not string: choose a text column '
                     f'with --column')
  row = 0
  for group in range(parquet.num_row_groups):
    try:
      values = parquet.read_row_group(group, columns=[field]).column(0).to_pylist()
    except (pa.ArrowException, OSError) as e:
      raise ValueError(f'{path}: row group {group} is corrupt ({e}): re-export the file') from e
    for value in values:
      yield _as_text(value, f'{path}: row {row}, column {field!r}')
      row += 1


def _as_text(value, where: str) -> str:
  """A document's text; null is an empty document (dropped by the length filter and counted as filtered)."""
  if value is None:
    return ''
  if not isinstance(value, str):
    raise ValueError(f'{where} is a {type(value).__name__}, not text: choose a text field')
  return value


_READERS = {'text': _read_text, 'jsonl': _read_jsonl, 'csv': _read_csv, 'parquet': _read_parquet,
            'chat': _read_chat, 'preference': _read_preference}
