"""What `stoker plan` searches over: kinds of hardware, their tensor-parallel degrees, and the engine
configurations (batch cap, token budget, KV pages) a replica of them can run, memory-infeasible ones left out."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import storage
from models.config import ModelConfig
from serve.bench import workload
from serve.bench.workload import WorkloadConfig
from serve.engine import EngineConfig
from serve.sim.shape import StepTimeModel


@dataclasses.dataclass(frozen=True)
class Hardware:
  """A kind of chip the planner may deploy on: its price, the tensor-parallel degrees it may use, the KV pages a
  replica of `tp` chips holds, and its step-time model for a replica's engine config."""
  name: str
  price_usd_per_hour: float  # per chip
  tps: tuple[int, ...]
  kv_pages: Callable[[int, int, int, int], int]  # (tp, page_size, max_seqs, token_budget) -> KV pool pages
  step_model: Callable[[int, EngineConfig], StepTimeModel]  # (tp, engine) -> model
  max_seqs_cap: int | None = None  # a profiled engine's limits: the model is not trusted beyond them
  token_budgets: tuple[int, ...] | None = None  # None: the plan's
  page_size: int | None = None  # None: the plan's


ARCHITECTURE = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim')


def divisors(n: int, most: int) -> tuple[int, ...]:
  return tuple(d for d in range(1, min(n, most) + 1) if n % d == 0)


def roofline_hardware(model: ModelConfig, names: Sequence) -> list[Hardware]:
  """Hardware for devices (names in devices.DEVICES, ['all'] for every one, or Device objects): tensor
  parallelism over divisors of the KV heads (each chip holds whole KV heads) up to the device's largest
  replica, the roofline step model and KV pool (serve/sim/roofline.py), price per chip-hour."""
  from serve.sim import devices, roofline  # pylint: disable=g-import-not-at-top
  if list(names) == ['all']:
    names = list(devices.DEVICES)
  unknown = [n for n in names if isinstance(n, str) and n not in devices.DEVICES]
  if unknown:
    raise ValueError(f'--devices {",".join(unknown)}: unknown; use some of {", ".join(devices.DEVICES)}.')
  out = []
  for d in names:
    d = devices.DEVICES[d] if isinstance(d, str) else d
    out.append(Hardware(
        d.name, d.price_usd_per_hour, divisors(model.num_kv_heads, d.max_chips),
        kv_pages=lambda tp, page_size, max_seqs, budget, d=d: roofline.kv_pages_available(
            model, d, tp, page_size, max_seqs=max_seqs, token_budget=budget),
        step_model=lambda tp, engine, d=d: roofline.RooflineModel(model, d, tp, engine)))
  return out


def profiled_hardware(model: ModelConfig, profile_dir: str, price_usd_per_hour: float) -> Hardware:
  """The backend a `stoker profile` directory was measured on, for the model it measured: one chip, the
  profiled engine's pages, page size and token budget, its batch cap at most, the fitted estimator.
  FileNotFoundError naming the path and the command when there is no profile."""
  from serve.sim import estimator  # pylint: disable=g-import-not-at-top
  profile = estimator.load_profile(profile_dir)
  measured = profile.meta.get('model', {})
  differ = [f'{k} {measured[k]} vs {getattr(model, k)}' for k in ARCHITECTURE
            if k in measured and measured[k] != getattr(model, k)]
  if differ:
    raise ValueError(f'--profile {profile_dir} measured another model than the one planned ({", ".join(differ)}); '
                     f'profile this one: `stoker profile --model PRESET (or --gin_file MODEL.gin) --out DIR`.')
  fitted = estimator.fit(profile)
  e = fitted.engine
  return Hardware(f'profile:{storage.basename(storage.absolute(profile_dir))}', price_usd_per_hour, (1,),
                  kv_pages=lambda tp, page_size, max_seqs, budget: e.num_pages,
                  step_model=lambda tp, engine: fitted, max_seqs_cap=e.max_seqs, token_budgets=(e.token_budget,),
                  page_size=e.page_size)


@dataclasses.dataclass(frozen=True)
class Candidate:
  hardware: Hardware
  tp: int
  engine: EngineConfig

  @property
  def price_usd_per_hour(self) -> float:
    return self.hardware.price_usd_per_hour * self.tp

  def describe(self) -> dict:
    e = self.engine
    return {'device': self.hardware.name, 'tp': self.tp, 'max_seqs': e.max_seqs, 'token_budget': e.token_budget,
            'num_pages': e.num_pages, 'page_size': e.page_size, 'max_pages_per_seq': e.max_pages_per_seq,
            'price_usd_per_hour': self.price_usd_per_hour}


def longest_request(wl: WorkloadConfig) -> int:
  """Prompt + output tokens of the longest request the workload can draw (at any request count)."""
  def high(text, name, column):
    spec = workload.LengthSpec.parse(text, name)
    return int(workload.read_trace(wl.trace)[column].max()) if spec.kind == 'trace' else spec.high
  return high(wl.prompt, 'prompt', workload.PROMPT_COLUMN) + high(wl.output, 'output', workload.OUTPUT_COLUMN)


def candidates(hardware: Sequence[Hardware], max_seqs_choices: Sequence[int], token_budgets: Sequence[int],
               page_size: int, max_len: int) -> tuple[list[Candidate], list[dict]]:
  """Every (hardware, tp, max_seqs, token_budget) whose replica holds the model and KV pages for the longest
  request (max_len tokens) beside the null page; and why each one left out was. A replica gets the pages
  max_seqs of the longest requests need, or all it holds if fewer."""
  out, skipped = [], []
  for hw in hardware:
    G = hw.page_size or page_size
    pages_per_seq = -(-max_len // G)
    cap = hw.max_seqs_cap or max(max_seqs_choices)
    for tp in hw.tps:
      for max_seqs in sorted({min(m, cap) for m in max_seqs_choices}):
        for budget in hw.token_budgets or token_budgets:
          if max_seqs > budget:
            continue  # the engine refuses it: a step could not decode every slot
          pages = hw.kv_pages(tp, G, max_seqs, budget)
          if pages - 1 < pages_per_seq:
            skipped.append({'device': hw.name, 'tp': tp, 'max_seqs': max_seqs, 'token_budget': budget,
                            'reason': f'memory: {pages} KV pages, the longest request ({max_len} tokens) needs '
                                      f'{pages_per_seq} + the null page'})
            continue
          engine = EngineConfig(num_pages=min(pages, max_seqs * pages_per_seq + 1), page_size=G,
                                max_seqs=max_seqs, max_pages_per_seq=pages_per_seq, token_budget=budget)
          out.append(Candidate(hw, tp, engine))
  return out, skipped
