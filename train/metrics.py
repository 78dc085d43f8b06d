"""Where training metrics go: <workdir>/metrics.jsonl (one object per logged step) and TensorBoard.

In a bucket workdir (gs://, s3://) objects cannot be appended to: both files are written to a local
mirror (storage.local_mirror) and uploaded whole at most every UPLOAD_EVERY_S seconds and on close,
so the bucket always holds complete files. A failed periodic upload is logged and left to the next one; the
last, at close, is retried and then raises.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

from tensorboardX import SummaryWriter

import storage

UPLOAD_EVERY_S = 10.0


class MetricsWriter:
  """Appends one JSON line per logged step and the same scalars to TensorBoard event files."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    """A fresh run (resume_step 0) starts the file anew; a resumed one keeps the records up to
    its checkpoint's step and drops later ones (the failed run's, which it recomputes).
    Disabled (processes other than 0 of a multi-process job), it writes nothing."""
    self.enabled = enabled
    if not enabled:
      return
    self.workdir = workdir
    self.local = storage.local_mirror(workdir)
    os.makedirs(self.local, exist_ok=True)
    self.path = os.path.join(self.local, 'metrics.jsonl')
    kept = []
    if resume_step and storage.exists(storage.join(workdir, 'metrics.jsonl')):
      kept = [r for r in read_metrics(workdir) if r['step'] <= resume_step]
    self._jsonl = open(self.path, 'w', buffering=1)
    for record in kept:
      self._jsonl.write(json.dumps(record) + '\n')
    self._tb_dir = os.path.join(self.local, 'tensorboard')
    self._tb = SummaryWriter(self._tb_dir)
    self._uploaded = time.monotonic()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    for name, value in scalars.items():
      if name != 'time':  # wall-clock time stamps the record; it is not a curve
        self._tb.add_scalar(name, value, step)
    if time.monotonic() - self._uploaded >= UPLOAD_EVERY_S:
      try:
        self.upload()
      except (OSError, ValueError) as e:  # a storage hiccup must not end the run; the next upload has it all
        logging.warning('Uploading the metrics to %s failed (%s); retrying at the next record.', self.workdir, e)
        self._uploaded = time.monotonic()

  def upload(self) -> None:
    """Copies metrics.jsonl and the TensorBoard event files to a bucket workdir (whole objects)."""
    if not self.enabled or not storage.is_bucket(self.workdir):
      return
    self._tb.flush()
    files = [(self.path, 'metrics.jsonl')] + [(os.path.join(self._tb_dir, n), f'tensorboard/{n}')
                                              for n in sorted(os.listdir(self._tb_dir))]
    for local, name in files:
      storage.with_retries(functools.partial(storage.put_file, local, storage.join(self.workdir, name)),
                           f'uploading {name}')
    self._uploaded = time.monotonic()

  def close(self) -> None:
    if not self.enabled:
      return
    self._jsonl.close()
    self._tb.close()
    self.upload()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(storage.join(workdir, 'metrics.jsonl')).splitlines()
          if line.strip()]
