"""`stoker prepare --runner beam`: prepare.py's stages as an Apache Beam pipeline; the same bytes come out.

  stoker prepare --runner beam --source 'corpus/*.jsonl' --train-tokenizer --out data   # DirectRunner, all cores
  stoker prepare --runner beam --direct_num_workers 2 ...
  stoker prepare --runner beam --beam_options '--runner=FlinkRunner --flink_master=HOST:8081' --out /shared/data ...

Without a --runner in --beam_options the DirectRunner runs the pipeline in --direct_num_workers processes
(direct_running_mode=multi_processing; 0: one per core). Every stage calls prepare.py's own function, so both paths
share one definition of each step:

  read      one file per element, on any worker (corpus.read_file): (position, text), position = (file, document)
  clean     prepare.clean, prepare.within_bounds
  dedup     across workers by content digest (CombinePerKey): the copy at the smallest position stays, as the
            first one read stays in process
  number    doc_id = the position's rank among the kept documents: per-file counts give each file's offset
  split     the validation_count(n) documents smallest by rank_key(digest, seed): a heap combine finds the
            largest of those keys, which every worker compares against
  tokenizer --tokenizer, or a BPE trained in one worker on prepare.tokenizer_sample's documents in doc_id order
  encode    tokenizer.encode in batches; chat conversations and preference pairs as prepare.py encodes them
  shard     shards.plan_shards over each split's lengths in doc_id order (one worker per split holds two integers
            per document), then one group per shard, written by shards.write_shard

Workers write into prepare.make_tmp's staging directory (the shards, a trained tokenizer.json, and small records
under .beam/: each file's fingerprint, the counts, the shard entries); the driver then writes manifest.json and
moves or uploads the directory as the in-process path does. Workers read gs:// and s3:// sources through storage/.
The staging directory is on this machine (OUT.tmp-<pid>, or a local temporary one for a bucket --out), so a cluster
runner (Dataflow, Flink, Spark) needs an --out on a file system all its workers mount; a bucket --out is refused
there, and workers that wrote elsewhere are reported, never taken for an empty output.

What one worker holds: a file's kept documents (numbering), the tokenizer's training documents (all of the train
split without --tokenizer-sample: give a cap, or --tokenizer, for a large corpus), a validation key per validation
document (the split's threshold), and two integers per document of a split (its shard plan).
"""

from __future__ import annotations

import bisect
import functools
import heapq
import json
import logging
import os
import re
import shlex
import shutil
from typing import Sequence

import storage
from data import chat
from data import corpus
from data import preference
from data import prepare as prep
from data import shards
from data import tokenizer as tok

try:
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:  # optional: check_beam() says how to install it
  beam = PipelineOptions = None
_CombineFn, _DoFn = (beam.CombineFn, beam.DoFn) if beam else (object, object)

# Runners whose workers are processes of this machine, which reach the driver's local staging directory.
LOCAL_RUNNERS = ('DirectRunner', 'SwitchingDirectRunner', 'BundleBasedDirectRunner', 'FnApiRunner', 'PrismRunner')
WORK = '.beam'  # under OUT.tmp-<pid>: the workers' records for the manifest, removed before the rename
_ENCODE_BATCH = 64
_WORKER_ERROR = re.compile(r'^(ValueError|FileNotFoundError): (.+)$', re.M)


def check_beam() -> None:
  """Raises a ValueError saying how to install Apache Beam if it is missing."""
  if beam is None:
    raise ValueError("--runner beam needs Apache Beam: pip install -e '.[beam]' (apache-beam==2.77.0), or drop "
                     '--runner beam to prepare in this process')


def pipeline_options(num_workers: int = 0, beam_options: str = ''):
  """PipelineOptions from --beam_options; without a --runner there, the multi-process DirectRunner."""
  check_beam()
  if num_workers < 0:
    raise ValueError(f'--direct_num_workers must be >= 0 (0: one per core), got {num_workers}')
  args = shlex.split(beam_options or '')
  if not any(a == '--runner' or a.startswith('--runner=') for a in args):
    args = ['--runner=DirectRunner', '--direct_running_mode=multi_processing',
            f'--direct_num_workers={num_workers}', '--default_sdk_harness_log_level=WARNING'] + args
  options = PipelineOptions(args)
  unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options()))
  if unknown:
    raise ValueError(f'--beam_options: unknown Beam option(s) {", ".join(unknown)}: check the spelling against '
                     f'the runner\'s pipeline options')
  return options


def prepare(cfg: prep.PrepareConfig, out: str, argv: Sequence[str] | None = None, *, num_workers: int = 0,
            beam_options: str = '', report: dict | None = None) -> dict:
  """prepare.prepare's output, byte for byte, from a Beam pipeline; returns the manifest.

  `report`, if given, receives 'readers': the id of the worker process that read each file, in file order.
  """
  check_beam()
  options = pipeline_options(num_workers, beam_options)
  runner = str(options.get_all_options().get('runner'))
  local = runner.split('.')[-1] in LOCAL_RUNNERS or runner.lower() in ('direct', 'prism')
  if not local and storage.is_bucket(out):
    raise ValueError(f'--out {out!r} with the {runner} runner: a bucket output is staged on this machine, '
                     f'which {runner} workers cannot reach: use the DirectRunner (no --runner in --beam_options), '
                     f'or an --out on a file system every worker mounts')
  prep._check_out(out, cfg.overwrite)  # pylint: disable=protected-access
  loaded = prep.load_tokenizer(cfg)
  if loaded is not None:
    tok.eos(loaded, cfg.eos_token)  # a bad --eos-token fails here, not in a worker
  template = prep.chat_template(cfg)  # a broken template too
  files = corpus.source_files(cfg.source, cfg.format, cfg.limit_files)
  if local:
    logging.getLogger('apache_beam').setLevel(logging.ERROR)  # each worker's start-up chatter otherwise
  tmp = prep.make_tmp(out)
  try:
    for split in prep.SPLITS:
      os.makedirs(os.path.join(tmp, split))
    os.makedirs(os.path.join(tmp, WORK))
    tokenizer_json = None
    if loaded is not None:
      prep.save_tokenizer(tmp, cfg, loaded)
      with open(os.path.join(tmp, prep.TOKENIZER), encoding='utf-8') as f:
        tokenizer_json = f.read()
    try:
      with beam.Pipeline(options=options) as pipeline:
        _build(pipeline, cfg, files, tmp, tokenizer_json, template and template.source)
    except Exception as e:  # a worker's error arrives as the runner's exception, its traceback in the text
      found = _WORKER_ERROR.findall(str(e))
      if not found:
        raise
      kind, message = found[-1]
      raise (ValueError if kind == 'ValueError' else FileNotFoundError)(message) from e
    manifest = _manifest(cfg, out, argv, tmp, report if report is not None else {}, runner, template)
    shutil.rmtree(os.path.join(tmp, WORK))
    prep.finish(tmp, out, manifest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _manifest(cfg: prep.PrepareConfig, out: str, argv: Sequence[str] | None, tmp: str, report: dict,
              runner: str, template) -> dict:
  """manifest.json from the workers' records, as prepare.prepare builds it."""
  records = {}
  for name in ('reads', 'kept', 'shards'):
    path = os.path.join(tmp, WORK, f'{name}.json')
    if not os.path.isfile(path):
      raise ValueError(f'the {runner} workers left no {path}: they do not share this file system with this '
                       f'machine; put --out on a file system every worker mounts, or use the DirectRunner')
    with open(path, encoding='utf-8') as f:
      records[name] = json.load(f)
  reads = sorted(records['reads'], key=lambda r: r[0])
  report['readers'] = [r[4] for r in reads]
  read, filtered = sum(r[2] for r in reads), sum(r[3] for r in reads)
  counts = {'read': read, 'duplicates': read - filtered - records['kept'], 'filtered': filtered,
            'kept': records['kept']}
  prep.check_not_empty(cfg, counts)
  source_info = corpus.describe(cfg.source, cfg.format, cfg.field, cfg.limit_files, [r[1] for r in reads])
  tokenizer = tok.load(os.path.join(tmp, prep.TOKENIZER))
  vocab = tok.vocab_size(tokenizer)
  tok.check_vocab_size(vocab, cfg.max_vocab)
  eos_token, eos_id = tok.eos(tokenizer, cfg.eos_token)
  splits = {}
  for split in prep.SPLITS:
    entries = [e for s, i, e in sorted(records['shards'], key=lambda r: (r[0], r[1])) if s == split]
    splits[split] = {'documents': sum(e['rows'] for e in entries), 'tokens': sum(e['tokens'] for e in entries),
                     'shards': entries}
  return prep.build_manifest(cfg, out, argv, tmp, source_info, counts, splits, vocab, eos_token, eos_id, template)


def _build(pipeline, cfg: prep.PrepareConfig, files: list[corpus.SourceFile], tmp: str,
           tokenizer_json: str | None, template: str | None) -> None:
  """The pipeline's stages (see the module docstring); `template` is the chat template's source."""
  singleton = beam.pvalue.AsSingleton
  work = os.path.join(tmp, WORK)

  # read, clean, filter: (digest, (position, text)); each file's record to the side
  read = (pipeline
          | 'files' >> beam.Create(list(enumerate(files)))
          | 'spread files' >> beam.Reshuffle()
          | 'read' >> beam.FlatMap(_read, cfg.field, cfg.min_chars, cfg.max_chars).with_outputs('reads', main='docs'))
  _ = read.reads | 'all reads' >> beam.combiners.ToList() | 'save reads' >> beam.Map(_save, work, 'reads')

  # dedup: the smallest position of each content digest; positions are unique, so texts are never compared
  kept = read.docs | 'dedup' >> beam.CombinePerKey(min)
  n_kept = kept | 'count kept' >> beam.combiners.Count.Globally()
  _ = n_kept | 'save kept' >> beam.Map(_save, work, 'kept')

  # number: doc_id = offset of the file + rank in the file
  by_file = kept | 'by file' >> beam.Map(lambda kv: (kv[1][0][0], (kv[1][0][1], kv[0], kv[1][1])))
  offsets = (by_file
             | 'kept per file' >> beam.combiners.Count.PerKey()
             | 'all files' >> beam.combiners.ToList()
             | 'offsets' >> beam.Map(_offsets))
  docs = (by_file
          | 'group file' >> beam.GroupByKey()
          | 'doc ids' >> beam.FlatMap(_number, singleton(offsets), cfg.seed))  # (doc_id, digest, key, text)

  # split: validation = the validation_count(n) smallest keys
  n_val = n_kept | 'validation count' >> beam.Map(prep.validation_count, cfg.validation_fraction)
  threshold = (docs
               | 'keys' >> beam.Map(lambda d: d[2])
               | 'threshold' >> beam.CombineGlobally(_LargestOfSmallest(), singleton(n_val)).without_defaults())
  split_docs = docs | 'split' >> beam.Map(  # (split, doc_id, digest, text)
      _split, singleton(threshold, default_value=None))  # no default: Beam's would not see the side input

  # tokenizer: the given one, or a BPE trained on the sample in doc_id order
  if tokenizer_json is not None:
    tokenizer = pipeline | 'tokenizer' >> beam.Create([tokenizer_json])
  else:
    sample = (split_docs
              | 'train docs' >> beam.Filter(lambda d: d[0] == 'train')
              | 'sample keys' >> beam.Map(_sample_key, cfg.seed, cfg.format, template))
    sample = (sample | 'sample' >> beam.combiners.Top.Smallest(cfg.tokenizer_sample)
              if cfg.tokenizer_sample is not None else sample | 'sample' >> beam.combiners.ToList())
    tokenizer = sample | 'train tokenizer' >> beam.FlatMap(_train, cfg.vocab_size, tmp)

  # encode
  tokens = (split_docs
            | 'texts' >> beam.Map(lambda d: (d[0], d[1], d[3]))
            | 'batch' >> beam.BatchElements(min_batch_size=1, max_batch_size=_ENCODE_BATCH)
            | 'encode' >> beam.ParDo(_Encode(cfg.eos_token, cfg.format, cfg.train_on, template),
                                     singleton(tokenizer, default_value=None)))

  # shard: plan each split in doc_id order, then one group per shard
  plans = (tokens
           | 'lengths' >> beam.Map(lambda t: (t[0], (t[1], len(t[2]))))
           | 'group split' >> beam.GroupByKey()
           | 'plan' >> beam.Map(_plan, cfg.shard_max_tokens))
  entries = (tokens
             | 'to shard' >> beam.Map(_to_shard, beam.pvalue.AsDict(plans))
             | 'group shard' >> beam.GroupByKey()
             | 'write shard' >> beam.Map(_write, tmp, beam.pvalue.AsDict(plans), cfg.row_group_size))
  _ = entries | 'all shards' >> beam.combiners.ToList() | 'save shards' >> beam.Map(_save, work, 'shards')


def _read(element, field: str, min_chars: int, max_chars: int | None):
  """One file's documents within the length bounds as (digest, ((file, document), text)), and its record
  (file, read_file's record, documents read, documents filtered, worker process id) to the 'reads' output."""
  index, file = element
  texts, record = corpus.read_file(corpus.SourceFile(*file), field)
  filtered = 0
  for i, text in enumerate(texts):
    text = prep.clean(text)
    if not prep.within_bounds(text, min_chars, max_chars):
      filtered += 1
      continue
    yield prep.content_digest(text), ((index, i), text)
  yield beam.pvalue.TaggedOutput('reads', (index, record, len(texts), filtered, os.getpid()))


def _offsets(counts: list[tuple[int, int]]) -> dict[int, int]:
  """Each file's first doc_id: the kept documents of the files before it."""
  offsets, total = {}, 0
  for index, count in sorted(counts):
    offsets[index], total = total, total + count
  return offsets


def _number(group, offsets: dict[int, int], seed: int):
  index, docs = group
  for rank, (_, digest, text) in enumerate(sorted(docs, key=lambda d: d[0])):
    yield offsets[index] + rank, digest, prep.rank_key(digest, seed), text


def _split(doc, threshold: bytes | None):
  doc_id, digest, key, text = doc
  return ('validation' if threshold is not None and key <= threshold else 'train'), doc_id, digest, text


class _LargestOfSmallest(_CombineFn):
  """The largest of the `k` smallest keys (None when k is 0): the keys up to it are exactly those k.

  An accumulator is a list of keys cut back to its k smallest whenever it doubles: at most 2k keys.
  """

  def create_accumulator(self, k):
    del k
    return []

  def add_input(self, keys, key, k):
    keys.append(key)
    return heapq.nsmallest(k, keys) if len(keys) >= 2 * max(k, 1) else keys

  def merge_accumulators(self, accumulators, k):
    return heapq.nsmallest(k, (key for keys in accumulators for key in keys))

  def extract_output(self, keys, k):
    smallest = heapq.nsmallest(k, keys)
    return smallest[-1] if smallest else None


def _sample_key(doc, seed: int, fmt: str, template: str | None) -> tuple[bytes, int, str]:
  """(tokenizer-sample key, doc_id, the text a BPE learns from: a chat or preference record rendered)."""
  _, doc_id, digest, text = doc
  if template is not None:
    text = prep.rendered(_template(template), json.loads(text), fmt)
  return prep.rank_key(digest, seed, prep.TOKENIZER_SALT), doc_id, text


@functools.lru_cache(maxsize=4)
def _template(source: str) -> chat.ChatTemplate:
  """A worker's ChatTemplate, made once per source (prepare.chat_template's, sent as text)."""
  return chat.ChatTemplate(source)


def _train(sample: list[tuple[bytes, int, str]], vocab_size: int, tmp: str):
  """The BPE trained on `sample` in doc_id order, saved as tmp/tokenizer.json; yields its JSON."""
  if not sample:
    return  # no documents: the driver reports the empty corpus
  tokenizer = tok.train_bpe([text for _, _, text in sorted(sample, key=lambda s: s[1])], vocab_size)
  text = tokenizer.to_str(pretty=True)
  with open(os.path.join(tmp, prep.TOKENIZER), 'w', encoding='utf-8') as f:
    f.write(text)
  yield text


class _Encode(_DoFn):
  """A batch of (split, doc_id, text) -> (split, doc_id, tokens) as prepare.prepare encodes each format; the
  tokenizer arrives as its JSON (a side input) and is parsed once per worker. A preference row's two sequences
  become documents 2 doc_id and 2 doc_id + 1."""

  def __init__(self, eos_token: str | None, fmt: str, train_on: str, template: str | None):
    super().__init__()
    self._eos_token, self._format, self._train_on, self._template = eos_token, fmt, train_on, template
    self._json = self._tokenizer = self._eos_id = None

  def process(self, batch, tokenizer_json: str):
    if tokenizer_json is not self._json and tokenizer_json != self._json:
      import tokenizers  # pylint: disable=g-import-not-at-top
      self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
      self._json, self._eos_id = tokenizer_json, tok.eos(self._tokenizer, self._eos_token)[1]
    if self._template is None:
      encoded = tok.encode(self._tokenizer, [text for _, _, text in batch], self._eos_id)
      for (split, doc_id, _), tokens in zip(batch, encoded):
        yield split, doc_id, tokens
      return
    template = _template(self._template)
    for split, doc_id, text in batch:
      if self._format == 'chat':
        yield split, doc_id, chat.encode_conversation(self._tokenizer, template, json.loads(text), self._eos_id,
                                                      self._train_on)
      else:
        pair = preference.encode_pair(self._tokenizer, template, json.loads(text), self._eos_id)
        yield split, 2 * doc_id, pair[0]
        yield split, 2 * doc_id + 1, pair[1]


def _plan(group, max_tokens: int) -> tuple[str, list[int]]:
  """(split, the first doc_id of each shard) by shards.plan_shards over the split's lengths in doc_id order."""
  split, lengths = group
  lengths = sorted(lengths)
  return split, [lengths[start][0] for start, _ in shards.plan_shards([n for _, n in lengths], max_tokens)]


def _to_shard(item, plans: dict[str, list[int]]):
  split, doc_id, tokens = item
  return (split, bisect.bisect_right(plans[split], doc_id) - 1), (doc_id, tokens)


def _write(group, tmp: str, plans: dict[str, list[int]], row_group_size: int):
  (split, index), docs = group
  docs = sorted(docs, key=lambda d: d[0])
  entry = shards.write_shard(tmp, split, index, len(plans[split]), [t for _, t in docs], [i for i, _ in docs],
                             row_group_size)
  return split, index, entry


def _save(value, work: str, name: str) -> None:
  with open(os.path.join(work, f'{name}.json'), 'w', encoding='utf-8') as f:
    json.dump(value, f)
