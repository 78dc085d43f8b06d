"""Multi-LoRA serving: many adapters over one base in one engine step.

Adapters are registered on the host (`AdapterStore`: numpy factors, zero-padded to the slot rank R,
b pre-multiplied by the adapter's scale) and copied on demand into a fixed number of device slots,
least recently used first out. Each adapted weight's slots are stacked:
  a [(L,) S, I..., R]   b [(L,) S, R, O...]      (a stacked layer axis first: the layer scan slices it)
and a step's tokens carry their slot id (an always-present step input): 0 is the base (no
adapter), 1..S the slots. Writing a slot is a jitted dynamic_update_slice over the stack, so
swapping adapters never compiles anything new.

The product (`MultiLoRA.einsum`, through models/layers.einsum's hook like int8 weights and
training's models/lora.LoRA): x W + sum_s [slot_t = s] (x a_s) b_s, as two dense matmuls over the
S * R concatenated ranks with a one-hot mask between them (benchmarks/multi_lora.py measures it
against gathering each token's factors). A base token's masked product is exactly 0, so the base's
logits are unchanged, bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import lora as lora_lib
from models.config import ModelConfig
from models.layers import einsum as base_einsum


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiLoRA:
  """An adapted weight Variable's value in a multi-LoRA step: the base weight (an array or an object
  with its own einsum), the slot stacks a [S, I..., R] and b [S, R, O...] (b already scaled), and
  the step's slot id per token (bound per layer by serve/forward.py; None while stored)."""

  base: Any
  a: jax.Array
  b: jax.Array
  slots_T: jax.Array | None = None

  def einsum(self, spec: str, x: jax.Array, preferred_element_type=None) -> jax.Array:
    """einsum(spec, x, W) plus each token's adapter product; x's last non-contracted axis is T."""
    x_sub, rest = spec.split(',')
    w_sub, out_sub = rest.split('->')
    n_in = self.a.ndim - 2
    in_sub, o_sub = w_sub[:n_in], w_sub[n_in:]
    keep = ''.join(c for c in x_sub if c not in in_sub)
    s, r = [c for c in 'SRZYXW' if c not in spec][:2]
    y = base_einsum(spec, x, self.base, preferred_element_type=preferred_element_type)
    S = self.a.shape[0]
    xa = jnp.einsum(f'{x_sub},{s}{in_sub}{r}->{keep}{s}{r}', x, self.a.astype(x.dtype))
    onehot_TS = self.slots_T[:, None] == jnp.arange(1, S + 1, dtype=self.slots_T.dtype)[None, :]
    xa = xa * onehot_TS.reshape((1,) * (len(keep) - 1) + onehot_TS.shape + (1,)).astype(xa.dtype)
    low = jnp.einsum(f'{keep}{s}{r},{s}{r}{o_sub}->{out_sub}', xa, self.b.astype(x.dtype),
                     preferred_element_type=preferred_element_type)
    return y + low.astype(y.dtype)


def bind(state, slots_T: jax.Array):
  """`state` (a layer's params) with every MultiLoRA given the step's per-token slot ids."""
  return jax.tree.map(lambda v: dataclasses.replace(v, slots_T=slots_T) if isinstance(v, MultiLoRA)
                      else v, state, is_leaf=lambda v: isinstance(v, MultiLoRA))


def path_name(path) -> str:
  """A param path as text: layers/attn/q_DNH."""
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted weight of the slot stacks: its path, the shape of its stacked layer axis (() or
  (L,)), its input and output shapes (after that axis), its dtype."""

  path: tuple
  lead: tuple[int, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  dtype: Any


def targets(cfg: ModelConfig, abstract_params: nnx.State) -> list[Target]:
  """The weights every slot adapts: those of models/lora.DEFAULT_TARGETS (attention and MLP)."""
  dims, flat = lora_lib.input_dims(cfg), dict(nnx.to_flat_state(abstract_params))
  out = []
  for path in lora_lib.targets(cfg, abstract_params, lora_lib.LoRAConfig()):
    v = flat[path]
    lead = 1 if cfg.scan_layers and path[0] == 'layers' else 0
    n_in = dims[path[-1]]
    out.append(Target(path, tuple(v.shape[:lead]), tuple(v.shape[lead:lead + n_in]),
                      tuple(v.shape[lead + n_in:]), jnp.dtype(v.dtype)))
  return out


def init_stacks(targets_: list[Target], slots: int, rank: int) -> dict:
  """Zero slot stacks {path name: (a, b)} (numpy: the engine places them)."""
  return {path_name(t.path): (np.zeros(t.lead + (slots,) + t.in_shape + (rank,), t.dtype),
                              np.zeros(t.lead + (slots,) + (rank,) + t.out_shape, t.dtype))
          for t in targets_}


def attach(params: nnx.State, stacks: dict) -> nnx.State:
  """`params` with each adapted weight holding MultiLoRA(base, a, b) (inside the jitted step)."""
  out = []
  for path, v in nnx.to_flat_state(params):
    name = path_name(path)
    if name in stacks:
      v = v.replace(MultiLoRA(v.get_value(), *stacks[name]))
    out.append((path, v))
  return nnx.from_flat_state(out)


def write_slot(axes: dict, stacks: dict, slot: jax.Array, factors: dict) -> dict:
  """`stacks` with stack index `slot` (0-based) holding `factors` (same keys; each (a, b) without
  the slot axis, which is axes[name]: after a stacked layer axis). Jit it with the stacks donated
  (axes bound): one compile, any slot."""
  out = {}
  for name, (a, b) in stacks.items():
    fa, fb = factors[name]
    out[name] = (jax.lax.dynamic_update_index_in_dim(a, fa.astype(a.dtype), slot, axes[name]),
                 jax.lax.dynamic_update_index_in_dim(b, fb.astype(b.dtype), slot, axes[name]))
  return out


@dataclasses.dataclass(eq=False)
class HostAdapter:
  """A registered adapter: numpy factors per target name, padded to the slot rank, b scaled.
  `key`: unique per registration (the prefix cache's root hash for its requests)."""

  name: str
  rank: int
  source: str
  factors: dict
  key: bytes
  live: int = 0  # engine requests using it
  unloaded: bool = False


class AdapterStore:
  """Adapters by name on the host, and which device slot holds which (LRU). Thread-safe: HTTP
  handlers register and unregister, the engine thread assigns slots."""

  def __init__(self, cfg: ModelConfig, abstract_params: nnx.State, slots: int, rank: int):
    self.cfg, self.slots, self.rank = cfg, slots, rank
    self.targets = targets(cfg, abstract_params) if slots else []
    self._by_path = {t.path: t for t in self.targets}
    self._adapters: dict[str, HostAdapter] = {}
    self._slot_of: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # key -> slot, LRU first
    self._lock = threading.Lock()
    self._keys = itertools.count()
    self.swaps = 0  # adapters copied into a slot

  def names(self) -> list[str]:
    with self._lock:
      return [n for n, a in self._adapters.items() if not a.unloaded]

  def get(self, name: str) -> HostAdapter | None:
    with self._lock:
      a = self._adapters.get(name)
      return None if a is None or a.unloaded else a

  def register(self, name: str, adapters: nnx.State, config: lora_lib.LoRAConfig,
               source: str = '') -> HostAdapter:
    """Adds adapter `name` (models/lora's adapter state for this base). ValueError naming the
    problem: no slots, a taken name, a rank over the slot rank, a weight this base lacks or of
    another shape."""
    if not self.slots:
      raise ValueError('this engine has no adapter slots (EngineConfig.max_loras=0); serve with '
                       '--lora NAME=PATH or --max-loras N to load adapters.')
    if not name or not re.fullmatch(r'[\w.\-/:]+', name):
      raise ValueError(f'adapter name {name!r}: use letters, digits and ._-/: only.')
    if config.rank > self.rank:
      raise ValueError(f'adapter {name!r} has rank {config.rank}, over the slot rank '
                       f'max_lora_rank={self.rank}; serve with --max-lora-rank {config.rank} or more.')
    factors = {path_name(t.path): (np.zeros(t.lead + t.in_shape + (self.rank,), np.float32),
                               np.zeros(t.lead + (self.rank,) + t.out_shape, np.float32))
               for t in self.targets}
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(adapters)}
    for path in {p[:-1] for p in flat}:
      t = self._by_path.get(path)
      if t is None:
        raise ValueError(f'adapter {name!r} adapts {path_name(path)}, which the served slots do not '
                         f'adapt (they cover {", ".join(path_name(t.path) for t in self.targets[:7])}).')
      a, b = np.asarray(flat[path + ('lora_a',)]), np.asarray(flat[path + ('lora_b',)])
      r = config.rank
      want_a, want_b = t.lead + t.in_shape + (r,), t.lead + (r,) + t.out_shape
      if a.shape != want_a or b.shape != want_b:
        raise ValueError(f'adapter {name!r}: {path_name(path)} has factors {a.shape} and {b.shape}, '
                         f'this base needs {want_a} and {want_b} (rank {r}); the adapter was '
                         'made for another base model.')
      fa, fb = factors[path_name(path)]
      fa[..., :r] = a
      if t.lead:
        fb[:, :r] = b.astype(np.float32) * config.scale
      else:
        fb[:r] = b.astype(np.float32) * config.scale
    with self._lock:
      if name in self._adapters and not self._adapters[name].unloaded:
        raise ValueError(f'an adapter named {name!r} is already loaded; unload it first or pick '
                         'another name.')
      adapter = HostAdapter(name, config.rank, source, factors,
                            f'lora:{name}:{next(self._keys)}'.encode())
      self._adapters[name] = adapter
    return adapter

  def unregister(self, name: str) -> None:
    """Removes `name` for new requests; KeyError if unknown. Its host copy goes once no request
    uses it."""
    with self._lock:
      adapter = self._adapters.get(name)
      if adapter is None or adapter.unloaded:
        raise KeyError(name)
      adapter.unloaded = True
      self._drop_if_unused(adapter)

  def acquire(self, name: str) -> HostAdapter:
    """A request starts using `name` (KeyError if unknown)."""
    with self._lock:
      adapter = self._adapters.get(name)
      if adapter is None or adapter.unloaded:
        raise KeyError(name)
      adapter.live += 1
      return adapter

  def release(self, adapter: HostAdapter) -> None:
    with self._lock:
      adapter.live -= 1
      self._drop_if_unused(adapter)

  def _drop_if_unused(self, adapter: HostAdapter) -> None:
    if adapter.unloaded and adapter.live == 0 and self._adapters.get(adapter.name) is adapter:
      del self._adapters[adapter.name]
      self._slot_of.pop(adapter.key, None)

  def assign(self, needed: list[HostAdapter]) -> tuple[dict[bytes, int], list[tuple[int, HostAdapter]]]:
    """Slot ids (1..slots) for the adapters a step needs (at most `slots` of them), and the
    (slot, adapter) copies to make first: least recently used slots not needed are reused."""
    with self._lock:
      writes = []
      keys = {a.key: a for a in needed}
      if len(keys) > self.slots:
        raise RuntimeError(f'a step needs {len(keys)} adapters, over the {self.slots} slots.')
      for key in keys:
        if key in self._slot_of:
          self._slot_of.move_to_end(key)
      for key, adapter in keys.items():
        if key in self._slot_of:
          continue
        used = set(self._slot_of.values())
        free = [s for s in range(1, self.slots + 1) if s not in used]
        if free:
          slot = free[0]
        else:
          victim = next(k for k in self._slot_of if k not in keys)
          slot = self._slot_of.pop(victim)
        self._slot_of[key] = slot
        writes.append((slot, adapter))
        self.swaps += 1
      return {k: self._slot_of[k] for k in keys}, writes

  @property
  def resident(self) -> int:
    with self._lock:
      return len(self._slot_of)
