"""Accelerators the planner can price and the roofline model can time: published figures, per chip.

Figures are per chip from the vendors' spec pages (sources beside each entry). Conventions:
  peak_flops       dense bf16 matmul FLOP/s (no sparsity)
  hbm_bytes_per_s  HBM bandwidth
  hbm_bytes        HBM capacity
  link_bytes_per_s what one chip can send into a ring all-reduce: half the published bidirectional
                   per-chip interconnect figure (ICI for TPUs, NVLink for GPUs)
  price_usd_per_hour  on-demand list price per chip-hour (prices change: check the page cited; the
                   planner reads them only from here, so edit this table)
  max_chips        the most chips of one replica: one host (TPU VM or 8-GPU server), the sensible
                   limit for tensor parallelism, whose all-reduces run every layer
"""

from __future__ import annotations

import dataclasses

GB = 1e9
TB = 1e12


@dataclasses.dataclass(frozen=True)
class Device:
  name: str
  peak_flops: float
  hbm_bytes_per_s: float
  hbm_bytes: float
  link_bytes_per_s: float
  price_usd_per_hour: float
  max_chips: int

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name != 'name' and not value > 0:
        raise ValueError(f'Device {self.name!r}: {f.name}={value!r}; give a positive figure.')


DEVICES: dict[str, Device] = {d.name: d for d in (
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s
    # bidirectional per chip (1600 Gbps), 8 chips per host. Price: cloud.google.com/tpu/pricing,
    # v5e on-demand $1.20 per chip-hour (us-central1).
    Device('tpu-v5e', 197e12, 819 * GB, 16 * GB, 200 * GB, 1.20, 8),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI 1200 GB/s
    # bidirectional per chip, 4 chips per host.
    # Price: cloud.google.com/tpu/pricing, v5p on-demand $4.20 per chip-hour (us-east5).
    Device('tpu-v5p', 459e12, 2765 * GB, 95 * GB, 600 * GB, 4.20, 4),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, ICI 800 GB/s
    # bidirectional per chip, 8 chips per host. Price: cloud.google.com/tpu/pricing, v6e
    # (Trillium) on-demand $2.70 per chip-hour (us-east1).
    Device('tpu-v6e', 918e12, 1638 * GB, 32 * GB, 400 * GB, 2.70, 8),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s bf16 dense (1979 with sparsity),
    # 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional. Price: AWS EC2 p5.48xlarge
    # on-demand $98.32/h (us-east-1) / 8 GPUs.
    Device('h100', 989e12, 3.35 * TB, 80 * GB, 450 * GB, 98.32 / 8, 8),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOP/s bf16 dense, 141 GB HBM3e at
    # 4.8 TB/s, NVLink 900 GB/s bidirectional. Price: no AWS on-demand figure checked; the H100
    # price x 1.10, the H200/H100 ratio of AWS EC2 Capacity Blocks accelerator-hour rates
    # ($5.408 vs $4.916, aws.amazon.com/ec2/capacityblocks/pricing).
    Device('h200', 989e12, 4.8 * TB, 141 * GB, 450 * GB, 98.32 / 8 * 1.10, 8),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 312 TFLOP/s bf16 dense, 80 GB HBM2e at
    # 2039 GB/s, NVLink 600 GB/s bidirectional. Price: AWS EC2 p4de.24xlarge on-demand $40.97/h
    # (us-east-1) / 8 GPUs.
    Device('a100-80g', 312e12, 2039 * GB, 80 * GB, 300 * GB, 40.97 / 8, 8),
)}


def device(name: str) -> Device:
  """DEVICES[name], or a ValueError listing the names."""
  if name not in DEVICES:
    raise ValueError(f'unknown device {name!r}; choose one of {sorted(DEVICES)} (serve/sim/devices.py).')
  return DEVICES[name]
