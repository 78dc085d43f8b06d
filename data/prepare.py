"""`stoker prepare`: raw text -> cleaned, deduplicated, tokenized documents in Parquet shards + manifest.json.

Output directory (the contract the Grain pipeline reads):

  manifest.json                                 format 'stoker-tokens-v1'; sorted keys, no timestamps
  tokenizer.json                                the tokenizer that made the tokens (trained here or copied)
  train/shard-00000-of-0000N.parquet ...        one row per document: tokens list<int32> (EOS last), doc_id int64
  validation/shard-00000-of-0000M.parquet ...

Steps: read (`corpus.py`) -> clean (line ends to \\n, control characters but \\n and \\t stripped, Unicode NFC)
-> length filters -> drop exact duplicates (sha256 of the cleaned text; the first one stays) -> split by document
-> train or load the tokenizer (`tokenizer.py`; trained on the train split only, or on --tokenizer-sample of its
documents) -> encode -> shards (`shards.py`). `doc_id` is a document's index among the kept documents. Everything is
written to `OUT.tmp-<pid>` and renamed to OUT at the end, so an OUT with a manifest.json is always complete; the
same inputs give byte-identical files. `--runner beam` runs the same stages, these functions, as an Apache Beam
pipeline (`beam.py`) and writes the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
import unicodedata
from typing import Sequence

import storage
from data import chat, preference
from data import shards
from data import corpus
from data import tokenizer as tok

FORMAT, MANIFEST = shards.FORMAT, shards.MANIFEST
TOKENIZER = 'tokenizer.json'
SPLITS = ('train', 'validation')
TOKENIZER_SALT = b'tokenizer'
_CONTROL = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]')  # C0/C1 controls but \t and \n; the BOM


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """What `stoker prepare` does; the fields are its flags."""

  source: str = corpus.STDLIB
  format: str = 'auto'
  field: str = 'text'
  limit_files: int | None = None
  tokenizer: str | None = None
  train_tokenizer: bool = False
  vocab_size: int = 4096
  tokenizer_sample: int | None = None
  max_vocab: int | None = None
  eos_token: str | None = None
  min_chars: int = 1
  max_chars: int | None = None
  validation_fraction: float = 0.05
  seed: int = 0
  shard_max_tokens: int = 2**20
  row_group_size: int = 256
  output_format: str = 'parquet'
  train_on: str = 'assistant'
  overwrite: bool = False

  def __post_init__(self):
    if bool(self.tokenizer) == self.train_tokenizer:
      raise ValueError('give exactly one of --tokenizer PATH (load a tokenizer.json) and --train-tokenizer '
                       '(train a byte-level BPE of --vocab-size entries)')
    for name in ('shard_max_tokens', 'row_group_size', 'vocab_size', 'tokenizer_sample'):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f'--{name.replace("_", "-")} must be positive, got {getattr(self, name)}')
    if self.tokenizer_sample is not None and self.tokenizer:
      raise ValueError('--tokenizer-sample picks the documents a BPE is trained on: drop it, or use '
                       '--train-tokenizer instead of --tokenizer')
    if self.limit_files is not None and self.limit_files < 1:
      raise ValueError(f'--limit-files must be positive, got {self.limit_files}')
    if self.min_chars < 0 or (self.max_chars is not None and self.max_chars < max(self.min_chars, 1)):
      raise ValueError(f'--min-chars {self.min_chars} / --max-chars {self.max_chars}: need '
                       f'0 <= min-chars <= max-chars and max-chars >= 1')
    if not 0 <= self.validation_fraction < 1:
      raise ValueError(f'--validation-fraction must be in [0, 1), got {self.validation_fraction}')
    if self.train_on not in chat.TRAIN_ON:
      raise ValueError(f'--train-on must be one of {", ".join(chat.TRAIN_ON)}, got {self.train_on!r}')
    if self.output_format not in shards.OUTPUT_FORMATS:
      raise ValueError(f'--output-format {self.output_format!r}: only parquet is written, the format the '
                       'training pipeline reads (data/source.py); ArrayRecord output is gone, as nothing '
                       'could train on it. Drop the flag.')


def add_arguments(p: argparse.ArgumentParser) -> None:
  """`stoker prepare`'s flags: PrepareConfig's fields, and --out."""
  p.add_argument('--source', default='stdlib',
                 help="'stdlib' (the running Python's standard library *.py files; default), or a file, "
                      'directory or glob of .txt/.md/.jsonl/.csv/.parquet files.')
  p.add_argument('--format', default='auto',
                 choices=['auto', 'text', 'jsonl', 'csv', 'parquet', 'chat', 'preference'],
                 help='Input format (default: from each file extension). chat: JSONL of OpenAI-style '
                      '"messages", rendered with the chat template of --tokenizer\'s directory (or the '
                      'default) and trained on the assistant turns only (see --train-on). preference: '
                      'JSONL of {"prompt", "chosen", "rejected"} (text or chat) for DPO (data/preference.py).')
  p.add_argument('--train-on', default='assistant', choices=chat.TRAIN_ON,
                 help="--format chat: the tokens the loss counts (default: the assistant's turns).")
  p.add_argument('--field', '--column', dest='field', default='text',
                 help='The JSONL field or CSV/Parquet column holding the text (default text).')
  p.add_argument('--limit-files', type=int, default=None, help='Read only the first N files (in order).')
  p.add_argument('--out', required=True, help='Output directory (written whole, or not at all).')
  p.add_argument('--overwrite', action='store_true', help='Replace an earlier output in --out.')
  p.add_argument('--tokenizer', default=None, help='A Hugging Face tokenizer.json (or its directory) to use.')
  p.add_argument('--train-tokenizer', action='store_true',
                 help='Train a byte-level BPE on the train split instead, saved as <out>/tokenizer.json.')
  p.add_argument('--vocab-size', type=int, default=4096, help='Vocabulary of the trained BPE (default 4096).')
  p.add_argument('--tokenizer-sample', type=int, default=None,
                 help='Train the BPE on at most N train documents (default: all): those first by '
                      'sha256("tokenizer", seed, content), in document order; the same with --runner beam.')
  p.add_argument('--max-vocab', type=int, default=None,
                 help="Fail if the tokenizer's vocabulary exceeds this (the model's vocab_size).")
  p.add_argument('--eos-token', default=None,
                 help='End-of-text token appended to each document (default: <|endoftext|>, </s>, ...).')
  p.add_argument('--min-chars', type=int, default=1, help='Drop documents shorter than this (default 1).')
  p.add_argument('--max-chars', type=int, default=None, help='Drop documents longer than this.')
  p.add_argument('--validation-fraction', type=float, default=0.05, help='Share of documents (default 0.05).')
  p.add_argument('--seed', type=int, default=0, help='Seed of the train/validation split (default 0).')
  p.add_argument('--shard-max-tokens', type=int, default=2**20, help='Tokens per shard at most (default 2^20).')
  p.add_argument('--row-group-size', type=int, default=256, help='Parquet rows per row group (default 256).')
  p.add_argument('--output-format', default='parquet', help='parquet, the only format (and the default).')
  p.add_argument('--runner', default='local', choices=['local', 'beam'],
                 help='local: in this process (default); beam: as an Apache Beam pipeline (data/beam.py, the '
                      "optional extra 'beam'), the same output byte for byte.")
  p.add_argument('--direct_num_workers', '--direct-num-workers', dest='direct_num_workers', type=int, default=0,
                 help="--runner beam on Beam's DirectRunner: worker processes (default 0: one per core).")
  p.add_argument('--beam_options', '--beam-options', dest='beam_options', default='',
                 help='--runner beam: Apache Beam pipeline options passed through, e.g. "--runner=DataflowRunner '
                      '--project=P --region=R --temp_location=gs://B/tmp" (default: the DirectRunner, '
                      'multi-process).')


def prepare_command(flags: dict, out: str, argv: Sequence[str] | None = None) -> int:
  """`stoker prepare`: PrepareConfig from the parsed `flags` (other keys ignored), prepare, and a summary."""
  fields = {f.name for f in dataclasses.fields(PrepareConfig)}
  cfg = PrepareConfig(**{k: v for k, v in flags.items() if k in fields})
  if flags.get('runner', 'local') == 'beam':
    from data import beam  # pylint: disable=g-import-not-at-top
    report = {}
    manifest = beam.prepare(cfg, out, argv, num_workers=flags.get('direct_num_workers') or 0,
                            beam_options=flags.get('beam_options') or '', report=report)
    print(f'Beam read {len(report["readers"])} files in {len(set(report["readers"]))} worker processes.')
  else:
    manifest = prepare(cfg, out, argv)
  train, val = manifest['splits']['train'], manifest['splits']['validation']
  print(f'Prepared {out}: {manifest["documents"]["kept"]} documents '
        f'(train {train["documents"]}, validation {val["documents"]}), '
        f'{train["tokens"] + val["tokens"]} tokens in {len(train["shards"]) + len(val["shards"])} shards, '
        f'vocabulary {manifest["tokenizer"]["vocab_size"]}. Manifest: {storage.join(out, "manifest.json")}')
  return 0


def clean(text: str) -> str:
  """Line ends to \\n, control characters (but \\n, \\t) and the BOM stripped, then Unicode NFC."""
  text = _CONTROL.sub('', text.replace('\r\n', '\n').replace('\r', '\n'))
  return unicodedata.normalize('NFC', text)


def within_bounds(text: str, min_chars: int = 1, max_chars: int | None = None) -> bool:
  """Whether a cleaned text passes the length filters (an empty document never does)."""
  return len(text) >= max(min_chars, 1) and (max_chars is None or len(text) <= max_chars)


def content_digest(text: str) -> bytes:
  """The sha256 of a cleaned text: what exact deduplication compares."""
  return hashlib.sha256(text.encode('utf-8')).digest()


def dedup_and_filter(texts: Sequence[str], min_chars: int = 1,
                     max_chars: int | None = None) -> tuple[list[str], list[bytes], dict]:
  """Cleans `texts`, drops those outside the length bounds, then all but the first of exact duplicates.

  Returns the kept texts, their sha256 digests, and the counts for the manifest.
  """
  seen, kept, digests, duplicates, filtered = set(), [], [], 0, 0
  for text in texts:
    text = clean(text)
    if not within_bounds(text, min_chars, max_chars):
      filtered += 1
      continue
    digest = content_digest(text)
    if digest in seen:
      duplicates += 1
      continue
    seen.add(digest)
    kept.append(text)
    digests.append(digest)
  counts = {'read': len(texts), 'duplicates': duplicates, 'filtered': filtered, 'kept': len(kept)}
  return kept, digests, counts


def split_validation(digests: Sequence[bytes], fraction: float, seed: int) -> list[bool]:
  """Whether each document is in the validation split.

  Documents are ranked by sha256(seed, content digest); the first round(fraction * n) go to validation (at least
  one when fraction > 0 and n >= 2, and never all). A document's rank depends only on its content and the seed.
  """
  ranked = sorted(range(len(digests)), key=lambda i: rank_key(digests[i], seed))
  chosen = set(ranked[:validation_count(len(digests), fraction)])
  return [i in chosen for i in range(len(digests))]


def validation_count(n: int, fraction: float) -> int:
  """How many of `n` documents go to validation: round(fraction * n), at least 1 if fraction > 0 and n >= 2,
  never all."""
  return min(max(1, round(fraction * n)), n - 1) if fraction > 0 and n >= 2 else 0


def rank_key(digest: bytes, seed: int, salt: bytes = b'') -> bytes:
  """A document's place in a seeded random order: sha256(salt, seed, content digest)."""
  return hashlib.sha256(salt + seed.to_bytes(8, 'little', signed=True) + digest).digest()


def tokenizer_sample(train_ids: Sequence[int], digests: Sequence[bytes], cap: int | None, seed: int) -> list[int]:
  """The train documents a BPE is trained on, in document order: all of them, or the `cap` first by
  rank_key(digest, seed, TOKENIZER_SALT)."""
  if cap is None or len(train_ids) <= cap:
    return list(train_ids)
  return sorted(sorted(train_ids, key=lambda i: rank_key(digests[i], seed, TOKENIZER_SALT))[:cap])


def load_tokenizer(cfg: PrepareConfig):
  """The --tokenizer given (None when one is to be trained), its vocabulary checked against --max-vocab."""
  if not cfg.tokenizer:
    tok.check_vocab_size(cfg.vocab_size, cfg.max_vocab)
    return None
  loaded = tok.load(cfg.tokenizer)
  tok.check_vocab_size(tok.vocab_size(loaded), cfg.max_vocab)
  return loaded


def check_not_empty(cfg: PrepareConfig, counts: dict) -> None:
  if not counts['kept']:
    raise ValueError(f'empty corpus: {counts["read"]} documents read from {cfg.source!r}, {counts["duplicates"]} '
                     f'duplicates, {counts["filtered"]} outside --min-chars {cfg.min_chars} / --max-chars '
                     f'{cfg.max_chars}: check --source/--field, or widen the length filters')


def prepare(cfg: PrepareConfig, out: str, argv: Sequence[str] | None = None) -> dict:
  """Runs the whole preparation into directory `out`; returns the manifest.

  `argv` (the `stoker` arguments, recorded in the manifest with the --out value as `<out>`) defaults to a
  command rebuilt from `cfg`.
  """
  _check_out(out, cfg.overwrite)
  loaded = load_tokenizer(cfg)
  raw, source_info = corpus.read_source(cfg.source, cfg.format, cfg.field, cfg.limit_files)
  texts, digests, counts = dedup_and_filter(raw, cfg.min_chars, cfg.max_chars)
  del raw
  check_not_empty(cfg, counts)
  in_validation = split_validation(digests, cfg.validation_fraction, cfg.seed)
  members = {'train': [i for i, v in enumerate(in_validation) if not v],
             'validation': [i for i, v in enumerate(in_validation) if v]}

  template = chat_template(cfg)
  if template is not None:
    records = [json.loads(t) for t in texts]
  corpus_texts = texts if template is None else [rendered(template, r, cfg.format) for r in records]
  tokenizer = loaded or tok.train_bpe([corpus_texts[i] for i in tokenizer_sample(
      members['train'], digests, cfg.tokenizer_sample, cfg.seed)], cfg.vocab_size)
  vocab = tok.vocab_size(tokenizer)
  tok.check_vocab_size(vocab, cfg.max_vocab)
  eos_token, eos_id = tok.eos(tokenizer, cfg.eos_token)
  if template is None:
    docs = tok.encode(tokenizer, texts, eos_id)
  elif cfg.format == 'chat':
    docs = [chat.encode_conversation(tokenizer, template, c, eos_id, cfg.train_on) for c in records]
  else:  # a row's two sequences become documents 2i and 2i + 1 (data/preference.py)
    docs = [preference.encode_pair(tokenizer, template, r, eos_id) for r in records]
    members = {split: [2 * i + k for i in ids for k in (0, 1)] for split, ids in members.items()}
    docs = [d for pair in docs for d in pair]

  tmp = make_tmp(out)
  try:
    save_tokenizer(tmp, cfg, tokenizer)
    splits = {}
    for split in SPLITS:
      ids = members[split]
      written = shards.write_split(tmp, split, [docs[i] for i in ids], ids, max_tokens=cfg.shard_max_tokens,
                                   row_group_size=cfg.row_group_size, output_format=cfg.output_format)
      splits[split] = {'documents': len(ids), 'tokens': sum(s['tokens'] for s in written), 'shards': written}
    manifest = build_manifest(cfg, out, argv, tmp, source_info, counts, splits, vocab, eos_token, eos_id, template)
    finish(tmp, out, manifest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def make_tmp(out: str) -> str:
  """The local directory the output is written to before `finish` moves (or uploads) it to `out`."""
  if storage.is_bucket(out):
    return tempfile.mkdtemp(prefix='stoker-prepare-')
  tmp = f'{os.path.normpath(out)}.tmp-{os.getpid()}'
  os.makedirs(tmp)
  return tmp


def save_tokenizer(tmp: str, cfg: PrepareConfig, tokenizer) -> None:
  """tokenizer.json: the --tokenizer file copied as it is, or the trained one."""
  if cfg.tokenizer:
    storage.get_file(tok.load_path(cfg.tokenizer), os.path.join(tmp, TOKENIZER))
  else:
    with open(os.path.join(tmp, TOKENIZER), 'w', encoding='utf-8') as f:
      f.write(tokenizer.to_str(pretty=True))


def build_manifest(cfg: PrepareConfig, out: str, argv: Sequence[str] | None, tmp: str, source_info: dict,
                   counts: dict, splits: dict, vocab: int, eos_token: str, eos_id: int,
                   template: chat.ChatTemplate | None = None) -> dict:
  """manifest.json for the files written under `tmp`; `template` renders --format chat and preference."""
  manifest = {
      'format': FORMAT,
      'command': recorded_command(argv if argv is not None else _argv_from_config(cfg, out), out),
      'source': source_info,
      'tokenizer': {'path': TOKENIZER, 'vocab_size': vocab, 'sha256': shards.sha256_file(
          os.path.join(tmp, TOKENIZER)), 'trained': not cfg.tokenizer, 'eos_token': eos_token},
      'eos_id': eos_id,
      'documents': counts,
      'cleaning': {'normalization': 'NFC', 'min_chars': cfg.min_chars, 'max_chars': cfg.max_chars,
                   'dedup': 'sha256 of the cleaned text'},
      'splits': splits,
      'validation_fraction': cfg.validation_fraction,
      'seed': cfg.seed,
      'output_format': cfg.output_format,
      'shard_max_tokens': cfg.shard_max_tokens,
      'row_group_size': cfg.row_group_size,
  }
  if cfg.tokenizer_sample is not None and not cfg.tokenizer:
    manifest['tokenizer']['sample'] = {'documents': cfg.tokenizer_sample,
                                       'rule': 'first by sha256("tokenizer", seed, content), in document order'}
  if template is not None:  # tokens the loss skips are stored as -1 - id (data/chat.py)
    manifest['chat'] = {'template': 'default' if template.is_default else 'tokenizer_config.json',
                        'train_on': cfg.train_on, 'skipped_tokens': 'stored as -1 - id'}
  if cfg.format == 'preference':
    manifest['preference'] = {'pairs': {k: v['documents'] // 2 for k, v in splits.items()},
                              'layout': 'document 2i: prompt + chosen; 2i + 1: prompt + rejected'}
  return manifest


def finish(tmp: str, out: str, manifest: dict) -> None:
  """Writes manifest.json last, then moves `tmp` to `out`."""
  with open(os.path.join(tmp, MANIFEST), 'w', encoding='utf-8') as f:
    f.write(json.dumps(manifest, sort_keys=True, indent=2) + '\n')
  _replace(tmp, out)


def chat_template(cfg: PrepareConfig) -> chat.ChatTemplate | None:
  """--format chat and preference: the chat template of --tokenizer's directory, or the default."""
  if cfg.format not in ('chat', 'preference'):
    return None
  return chat.ChatTemplate(chat.load_template(storage.dirname(tok.load_path(cfg.tokenizer))
                                              if cfg.tokenizer else None))


def rendered(template, record, fmt: str) -> str:
  """The text a record puts in front of the tokenizer (what a trained BPE learns from)."""
  if fmt == 'chat':
    return template.render(record, False)
  if isinstance(record['prompt'], str):
    return '\n'.join(record[k] for k in preference.KEYS)
  return '\n'.join([template.render(record['prompt'], True), record['chosen'], record['rejected']])


def read_manifest(directory: str) -> dict:
  path = storage.join(directory, MANIFEST)
  if not storage.isfile(path):
    raise FileNotFoundError(f'{path} not found: {directory!r} is not a `stoker prepare` output (run stoker prepare '
                            f'--out {directory})')
  manifest = json.loads(storage.read_text(path))
  if manifest.get('format') != FORMAT:
    raise ValueError(f'{path}: format {manifest.get("format")!r}, expected {FORMAT!r}: re-run stoker prepare')
  return manifest


def check_vocab(manifest_dir: str, model_vocab_size: int) -> dict:
  """Raises ValueError if the tokens of `manifest_dir` need more embedding rows than the model has."""
  manifest = read_manifest(manifest_dir)
  tok.check_vocab_size(manifest['tokenizer']['vocab_size'], model_vocab_size)
  return manifest


def recorded_command(argv: Sequence[str], out: str) -> str:
  """`stoker <argv>` with the output directory written `<out>`, so that the manifest is the same wherever it goes."""
  args = []
  for i, arg in enumerate(argv):
    if arg == out and i > 0 and argv[i - 1] == '--out':
      arg = '\0'
    elif arg == f'--out={out}':
      arg = '--out=\0'
    args.append(arg)
  return 'stoker ' + shlex.join(args).replace("'\0'", '<out>').replace("'--out=\0'", '--out=<out>')


def _argv_from_config(cfg: PrepareConfig, out: str) -> list[str]:
  argv = ['prepare', '--out', out]
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    flag = '--' + field.name.replace('_', '-')
    if value != field.default:
      argv += [flag] if value is True else [flag, str(value)]
  return argv


def _check_out(out: str, overwrite: bool) -> None:
  storage.check(out, write=True)  # an unusable bucket fails before any work
  if not storage.exists(out):
    return
  if not storage.isdir(out):
    raise ValueError(f'--out {out!r} exists and is not a directory: choose another --out')
  if storage.isfile(storage.join(out, MANIFEST)):
    if not overwrite:
      raise ValueError(f'--out {out!r} already holds a prepared dataset ({MANIFEST}): pass --overwrite to '
                       f'replace it, or choose another --out')
  elif storage.listdir(out):
    raise ValueError(f'--out {out!r} exists, is not empty and is not a `stoker prepare` output: choose another '
                     f'--out (it is never overwritten)')


def _replace(tmp: str, out: str) -> None:
  """Moves the finished `tmp` to `out`, replacing an earlier output (checked by _check_out) only at the end."""
  if storage.is_bucket(out):
    _upload(tmp, out)
    return
  old = None
  if os.path.exists(out):
    old = f'{os.path.normpath(out)}.old-{os.getpid()}'
    os.rename(out, old)
  os.rename(tmp, out)
  if old:
    shutil.rmtree(old)


def _upload(tmp: str, out: str) -> None:
  """Uploads the finished local `tmp` to the bucket prefix `out`, manifest.json last: a bucket has no rename,
  so the manifest is the commit marker (readers need it; an upload cut short leaves a prefix without one). An
  earlier output loses its manifest first, then its objects."""
  if storage.exists(storage.join(out, MANIFEST)):
    storage.remove(storage.join(out, MANIFEST))
    storage.rmtree(out)
  names = sorted(os.path.relpath(os.path.join(d, n), tmp) for d, _, files in os.walk(tmp) for n in files)
  for name in [n for n in names if n != MANIFEST] + [MANIFEST]:
    storage.put_file(os.path.join(tmp, name), storage.join(out, *name.split(os.sep)))
  shutil.rmtree(tmp)
