"""The roofline step-time model against hand-computed figures, and the directions it must move in."""

import dataclasses
import os

import pytest

from models import presets
from models.config import ModelConfig
from serve.engine import EngineConfig
from serve.sim import devices, estimator, roofline
from serve.sim.devices import Device
from serve.sim.roofline import RooflineModel, kv_pages_available
from serve.sim.shape import StepShape

LLAMA8B = presets.preset('llama3_8b')
H100 = devices.DEVICES['h100']
ENGINE = EngineConfig(num_pages=1024, max_seqs=16, token_budget=512, min_bucket=16)
# Llama-3-8B by hand: per layer q and o 4096 x 4096, k and v 4096 x 1024, MLP 3 x 4096 x 14336.
LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # 218,103,808
WEIGHTS_READ = 32 * LAYER + 4096 * 128_256  # + the LM head; the embedding table is gathered, not read


def test_weights_read_match_the_parameter_count():
  # Everything but the embedding table and the norm scales is read each step.
  assert WEIGHTS_READ == LLAMA8B.num_params() - 4096 * 128_256 - (2 * 32 + 1) * 4096


def test_llama3_8b_decode_batch1_on_h100_is_weight_bandwidth_bound():
  model = RooflineModel(LLAMA8B, H100, 1, ENGINE)
  b = model.breakdown(StepShape((1,), (1,)))
  # ~15.0 GB of bf16 weights / 3.35 TB/s = 4.48 ms, / 0.8 efficiency = 5.60 ms; the KV of one
  # token and the activations of a 16-token bucket add < 1%.
  by_hand = WEIGHTS_READ * 2 / 3.35e12 / 0.8
  assert by_hand == pytest.approx(5.60e-3, rel=1e-3)
  assert b['memory_s'] == pytest.approx(by_hand, rel=0.01)
  assert b['compute_s'] < b['memory_s'] / 5
  assert b['allreduce_s'] == 0
  assert model.step_time_s(StepShape((1,), (1,))) == pytest.approx(b['memory_s'] + 1e-3, rel=1e-12)


def test_llama3_8b_prefill_512_on_h100_is_compute_bound():
  model = RooflineModel(LLAMA8B, H100, 1, ENGINE)
  b = model.breakdown(StepShape((512,), (512,)))
  flops = (2 * 512 * 32 * LAYER  # every token through every layer's weights
           + 2 * 16 * 4096 * 128_256  # the LM head on max_seqs rows
           + 4 * 32 * 32 * 128 * 512 * 512)  # scores and values of 512 queries x 512 keys
  assert b['compute_s'] == pytest.approx(flops / (989e12 * 0.5), rel=1e-9)
  assert b['compute_s'] > b['memory_s']  # ~15 ms against ~6 ms


def test_tensor_parallel_all_reduce_by_hand():
  b = RooflineModel(LLAMA8B, H100, 8, ENGINE).breakdown(StepShape((1,), (1,)))
  # 2 all-reduces per layer of the [16, 4096] bf16 activations: ring 2 * 7/8 * 131072 B / 450 GB/s.
  assert b['allreduce_s'] == pytest.approx(2 * 32 * (2 * 7 / 8 * 16 * 4096 * 2 / 450e9 + 10e-6), rel=1e-9)


def test_tokens_padded_to_the_engine_bucket():
  model = RooflineModel(LLAMA8B, H100, 1, ENGINE)
  assert model.breakdown(StepShape((17,), (17,)))['compute_s'] > model.breakdown(
      StepShape((16,), (16,)))['compute_s'] * 1.9  # 17 tokens run as a 32-token bucket
  assert roofline.padded_tokens(17, ENGINE.buckets()) == 32
  assert roofline.padded_tokens(600, ENGINE.buckets()) == 1024  # past the budget: doubling on


@pytest.mark.parametrize('name', sorted(devices.DEVICES))
def test_more_work_is_never_faster(name):
  model = RooflineModel(LLAMA8B, devices.DEVICES[name], 1, ENGINE)
  decodes = [model.step_time_s(StepShape((1,) * b, (1024,) * b)) for b in (1, 2, 4, 8, 16, 64)]
  contexts = [model.step_time_s(StepShape((1,) * 8, (kv,) * 8)) for kv in (1, 64, 1024, 8192, 32768)]
  chunks = [model.step_time_s(StepShape((q,), (q + 256,))) for q in (1, 16, 100, 256, 512)]
  for series in (decodes, contexts, chunks):
    assert series == sorted(series), series
  assert contexts[-1] > contexts[0]  # KV reads count


def test_tensor_parallelism_shrinks_memory_time_and_adds_all_reduce():
  shape = StepShape((1,) * 16, (2048,) * 16)
  by_tp = {tp: RooflineModel(LLAMA8B, H100, tp, ENGINE).breakdown(shape) for tp in (1, 2, 4, 8)}
  memory = [by_tp[tp]['memory_s'] for tp in (1, 2, 4, 8)]
  allreduce = [by_tp[tp]['allreduce_s'] for tp in (1, 2, 4, 8)]
  assert memory == sorted(memory, reverse=True) and memory[1] < 0.55 * memory[0]
  assert allreduce[0] == 0 and allreduce == sorted(allreduce)


def test_kv_pages_available_by_hand():
  page_bytes = 16 * 2 * 32 * 8 * 128 * 2  # tokens x (K and V) x layers x kv heads x head dim x bf16
  activations = 512 * (4 * 4096 + 2 * 48 * 128 + 2 * 4096 + 6 * 14336) * 2
  free = 80e9 * 0.9 - LLAMA8B.num_params() * 2 - activations - 256 * 128_256 * 4
  assert kv_pages_available(LLAMA8B, H100, 1, 16) == int(free // page_bytes)  # ~26,500 pages
  assert 26_000 < kv_pages_available(LLAMA8B, H100, 1, 16) < 27_000
  v5e = devices.DEVICES['tpu-v5e']
  assert kv_pages_available(LLAMA8B, v5e, 1, 16) == 0  # 16 GB of weights in 16 GB of HBM
  pages = [kv_pages_available(LLAMA8B, v5e, tp, 16) for tp in (2, 4, 8)]
  assert 0 < pages[0] < pages[1] < pages[2]
  # Past K = 8 chips the KV heads are replicated: a page costs tp / K times as much.
  assert kv_pages_available(LLAMA8B, H100, 16, 16) < 2 * kv_pages_available(LLAMA8B, H100, 8, 16)


def test_devices_cover_the_agreed_kinds_and_reject_bad_figures():
  assert {'tpu-v5e', 'tpu-v5p', 'tpu-v6e', 'h100', 'h200', 'a100-80g'} <= set(devices.DEVICES)
  assert devices.DEVICES['h200'].hbm_bytes > devices.DEVICES['h100'].hbm_bytes
  with pytest.raises(ValueError, match='hbm_bytes_per_s'):
    dataclasses.replace(H100, hbm_bytes_per_s=0)
  with pytest.raises(ValueError, match="unknown device 'tpu-v9'"):
    devices.device('tpu-v9')
  with pytest.raises(ValueError, match='tp=0'):
    RooflineModel(LLAMA8B, H100, 0, ENGINE)
  with pytest.raises(ValueError, match='memory_efficiency'):
    RooflineModel(LLAMA8B, H100, 1, ENGINE, memory_efficiency=1.5)
  assert isinstance(H100, Device)


def test_no_measured_h100_step_beats_the_ideal_roofline():
  """The shipped H100 profile of Llama-3-8B: the roofline with perfect efficiency and no host
  overhead is a lower bound on every measured step (device-only and wall)."""
  profile = estimator.load_profile(os.path.join(os.path.dirname(estimator.__file__), 'profiles',
                                                'llama3_8b_h100'))
  model = ModelConfig(**{k: v for k, v in profile.meta['model'].items() if k != 'rope_scaling'})
  assert model == dataclasses.replace(LLAMA8B, param_dtype='bfloat16')
  ideal = RooflineModel(model, H100, 1, profile.engine, compute_efficiency=1, memory_efficiency=1,
                        host_overhead_s=0)
  ratios = [min(w, d) / ideal.step_time_s(s)
            for s, w, d in zip(profile.shapes, profile.wall_s, profile.device_s)]
  assert 1 < min(ratios) and max(ratios) < 10, (min(ratios), max(ratios))
