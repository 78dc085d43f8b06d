"""Accelerators the planner can price and the roofline model can time: the one device table,
parallelism/devices.py (peak FLOP/s, HBM bandwidth and capacity, interconnect, list price, chips per
host), which MFU, cost logging and `stoker k8s` read too. Edit figures there."""

from __future__ import annotations

from parallelism.devices import DEVICES, GB, TB, Device, device  # pylint: disable=unused-import
