"""Where training metrics go: <workdir>/metrics.jsonl (one object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends one JSON line per logged step and the same scalars to TensorBoard event files."""

  def __init__(self, workdir: str, append: bool = False):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._jsonl = open(self.path, 'a' if append else 'w', buffering=1)
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
