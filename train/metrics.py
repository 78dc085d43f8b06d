"""Where training metrics go: <workdir>/metrics.jsonl (one object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends one JSON line per logged step and the same scalars to TensorBoard event files."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    """A fresh run (resume_step 0) starts the file anew; a resumed one keeps the records up to
    its checkpoint's step and drops later ones (the failed run's, which it recomputes).
    Disabled (processes other than 0 of a multi-process job), it writes nothing."""
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    kept = []
    if resume_step and os.path.exists(self.path):
      kept = [r for r in read_metrics(workdir) if r['step'] <= resume_step]
    self._jsonl = open(self.path, 'w', buffering=1)
    for record in kept:
      self._jsonl.write(json.dumps(record) + '\n')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    for name, value in scalars.items():
      if name != 'time':  # wall-clock time stamps the record; it is not a curve
        self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if not self.enabled:
      return
    self._jsonl.close()
    self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
