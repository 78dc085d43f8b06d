"""The seam between training and data/: which batches a TrainConfig trains and evaluates on."""

from __future__ import annotations

import logging
import os
from typing import Iterator

import jax

from data import pipeline, preference, prepare, source
from data.synthetic import Batch, SyntheticData, SyntheticIterator
from train.config import TrainConfig


def data_dir(cfg: TrainConfig) -> str | None:
  """The prepared directory to read, preparing the stdlib corpus on first use; None: synthetic."""
  source = cfg.data.source
  if source == 'synthetic':
    return None
  if source == 'stdlib':
    path = os.path.join(os.path.expanduser(cfg.data.cache_dir), f'stdlib-v{cfg.model.vocab_size}')
    if not os.path.exists(os.path.join(path, 'manifest.json')):
      if jax.process_count() > 1:
        raise ValueError(f"data.source='stdlib' is not prepared in {path}; prepare it once before a "
                         f'multi-process run: stoker prepare --source stdlib --train-tokenizer '
                         f'--vocab-size {cfg.model.vocab_size} --out {path}')
      logging.info('Preparing the stdlib corpus into %s (once; about a minute).', path)
      prepare.prepare(prepare.PrepareConfig(train_tokenizer=True, vocab_size=cfg.model.vocab_size),
                      path)
    source = path
  prepare.check_vocab(source, cfg.model.vocab_size)
  return source


def train_batches(cfg: TrainConfig, directory: str | None) -> Iterator[Batch]:
  """This process's training batches: endless, shuffled with cfg.seed."""
  if directory is None:
    if jax.process_count() > 1:
      raise ValueError("data.source='synthetic' is single-process; use a prepared dataset.")
    return SyntheticIterator(SyntheticData(cfg.model.vocab_size, cfg.seq_len, cfg.batch_size,
                                           seed=cfg.seed))
  pairs = 'preference' in prepare.read_manifest(directory)
  if pairs != bool(cfg.dpo.beta):
    raise ValueError(f'{directory} holds preference pairs: train on it with DPO (dpo.beta, e.g. 0.1).'
                     if pairs else f'DPO (dpo.beta={cfg.dpo.beta}) trains on preference pairs; '
                     f'{directory} holds documents: prepare one with stoker prepare --format preference.')
  if pairs:
    if jax.process_count() > 1:
      raise ValueError('DPO reads its pairs in one process for now; run it single-process.')
    return preference.PreferenceBatches(source.open_split(directory, 'train'), seq_len=cfg.seq_len,
                                        pairs=cfg.batch_size // 2, seed=cfg.seed)
  return pipeline.make_iterator(directory, 'train', seq_len=cfg.seq_len,
                                global_batch_size=cfg.batch_size, seed=cfg.seed,
                                worker_count=cfg.data.worker_count)


def validation_batches(cfg: TrainConfig, directory: str) -> pipeline.PipelineIterator:
  """One pass over the validation split, in order; the last batch padded (loss_mask 0)."""
  return pipeline.make_iterator(directory, 'validation', seq_len=cfg.seq_len,
                                global_batch_size=cfg.batch_size, num_epochs=1, shuffle=False)
