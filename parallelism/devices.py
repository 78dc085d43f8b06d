"""The one device table: published figures and a list price per accelerator chip. Every user reads
it from here: model FLOPs utilisation (train/flops.py), the training cost estimate and exporter
(train/monitoring.py), `stoker k8s` (deploy/, through train/monitoring.py) and the serving
simulator and planner (serve/sim/devices.py, roofline.py, plan_space.py). Edit figures here only.

Figures are per chip from the vendors' spec pages (sources beside each entry). Conventions:
  peak_flops       dense bf16 matmul FLOP/s (no sparsity)
  hbm_bytes_per_s  HBM bandwidth
  hbm_bytes        HBM capacity
  link_bytes_per_s what one chip can send into a ring all-reduce: half the published bidirectional
                   per-chip interconnect figure (ICI for TPUs, NVLink for GPUs)
  price_usd_per_hour  on-demand list price per chip-hour (PRICE_SOURCE; prices change: check the
                   page cited). Commitments and Spot VMs cost less; pass your own rate where a
                   function takes one (monitoring.estimate_cost, `stoker plan --profile-price`)
  max_chips        the most chips of one replica: one host (TPU VM or 8-GPU server), the sensible
                   limit for tensor parallelism, whose all-reduces run every layer
  kinds            substrings of jax.Device.device_kind that name this device (case-insensitive;
                   the table is searched in order, first match wins: 'TPU v5 lite' before 'TPU v5')
  aliases          other names, e.g. `stoker k8s train --tpu v5e-256`'s 'v5e'
"""

from __future__ import annotations

import dataclasses

GB = 1e9
TB = 1e12
PRICE_SOURCE = ('Google Cloud on-demand list prices, 2025: cloud.google.com/tpu/pricing (TPU, per '
                'chip-hour); A2/A3 VM prices per GPU (cloud.google.com/compute/vm-instance-pricing)')


@dataclasses.dataclass(frozen=True)
class Device:
  name: str
  peak_flops: float
  hbm_bytes_per_s: float
  hbm_bytes: float
  link_bytes_per_s: float
  price_usd_per_hour: float
  max_chips: int
  kinds: tuple[str, ...] = ()
  aliases: tuple[str, ...] = ()

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name not in ('name', 'kinds', 'aliases') and not value > 0:
        raise ValueError(f'Device {self.name!r}: {f.name}={value!r}; give a positive figure.')


DEVICES: dict[str, Device] = {d.name: d for d in (
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, ICI 800 GB/s
    # bidirectional per chip, 8 chips per host. Price: v6e (Trillium) $2.70 per chip-hour.
    Device('tpu-v6e', 918e12, 1638 * GB, 32 * GB, 400 * GB, 2.70, 8, ('TPU v6 lite',), ('v6e',)),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s
    # bidirectional per chip (1600 Gbps), 8 chips per host. Price: v5e $1.20 per chip-hour.
    Device('tpu-v5e', 197e12, 819 * GB, 16 * GB, 200 * GB, 1.20, 8, ('TPU v5 lite',), ('v5e',)),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI 1200 GB/s
    # bidirectional per chip, 4 chips per host. Price: v5p $4.20 per chip-hour. v5p reports
    # 'TPU v5' on some runtimes.
    Device('tpu-v5p', 459e12, 2765 * GB, 95 * GB, 600 * GB, 4.20, 4, ('TPU v5p', 'TPU v5'), ('v5p',)),
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s, 4 chips per host;
    # no per-chip ICI figure: the all-reduce bandwidth per pod (1.1 PB/s) over its 4096 chips.
    # Price: v4 $3.22 per chip-hour.
    Device('tpu-v4', 275e12, 1200 * GB, 32 * 2**30, 1.1e15 / 4096, 3.22, 4, ('TPU v4',), ('v4',)),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOP/s bf16 dense, 141 GB HBM3e at
    # 4.8 TB/s, NVLink 900 GB/s bidirectional. Price: a3-ultragpu-8g / 8 GPUs, $10.60.
    Device('h200', 989e12, 4.8 * TB, 141 * GB, 450 * GB, 10.60, 8, ('H200',)),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s bf16 dense (1979 with sparsity;
    # the PCIe card peaks at 756), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional.
    # Price: a3-highgpu-8g / 8 GPUs, $11.03.
    Device('h100', 989e12, 3.35 * TB, 80 * GB, 450 * GB, 11.03, 8, ('H100',)),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 312 TFLOP/s bf16 dense, 80 GB HBM2e at
    # 2039 GB/s, NVLink 600 GB/s bidirectional. Price: no Google Cloud figure checked; AWS EC2
    # p4de.24xlarge on-demand $40.97/h (us-east-1) / 8 GPUs.
    Device('a100-80g', 312e12, 2039 * GB, 80 * GB, 300 * GB, 40.97 / 8, 8, ('A100-SXM4-80GB', 'A100 80GB')),
    # The same datasheet (SXM4 40GB): 40 GB HBM2 at 1555 GB/s. Price: a2-highgpu-1g, $3.67.
    Device('a100-40g', 312e12, 1555 * GB, 40 * GB, 300 * GB, 3.67, 8, ('A100',)),
)}


def device(name: str) -> Device:
  """The device called `name` (a DEVICES key or an alias, any case), or a ValueError listing them."""
  key = name.lower()
  for d in DEVICES.values():
    if key == d.name or key in d.aliases:
      return d
  raise ValueError(f'unknown device {name!r}; choose one of {sorted(DEVICES)} (parallelism/devices.py).')


def for_kind(device_kind: str) -> Device | None:
  """The device a jax.Device.device_kind (or a name or alias) names; None for one not in the table."""
  try:
    return device(device_kind)
  except ValueError:
    pass
  kind = device_kind.lower()
  for d in DEVICES.values():
    if any(k.lower() in kind for k in d.kinds):
      return d
  return None
