"""Low-rank adapters (LoRA; Hu et al. 2021) over the decoder's weight matrices.

A weight W with input (contracted) axes I... and output axes O... gets an adapter pair
  a [I..., r] (uniform in +-1/sqrt(|I|), PEFT's default)   b [r, O...] (zeros),
and its product becomes  x W + scale (dropout(x) a) b,  scale = alpha / r (alpha / sqrt(r) with
rsLoRA). With b = 0 the model is the base model; `merge` folds the adapter into W.

Adapters live apart from the weights, in an nnx.State that mirrors the params' paths
(`.../q_DNH/lora_a`, `.../q_DNH/lora_b`) and holds `Adapter` Variables whose logical axes are the
weight's (the rank axis unsharded): they shard by the same rule table, and training differentiates and
optimises them alone while the base stays a frozen input. `attach` makes the params the model runs
with: each adapted Variable holds a `LoRA(base, a, b)` instead of an array, and models/layers.einsum
hands it the product (two thin matmuls beside the base one; the [I, O] update is never formed).

Why not qwix's LoRA (qwix 0.1.8, read for this): it intercepts jnp.einsum inside a module's method,
finds the weight operand by identity and creates the adapter params inside that call on first use.
Here the blocks run under lax.scan over split state (params created inside the scan body do not
persist), weights are cast to the compute dtype before their einsum (the identity is lost), and the
paged serving forward calls each projection outside any intercepted method. The same math fits in
the einsum hook the int8 weights already use, with the adapters as explicit state that training,
checkpoints and PEFT export handle like any other.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import hf, quant
from models.config import ModelConfig
from models.layers import einsum

# The weights QLoRA holds in int8, as bitsandbytes' QLoRA quantizes every Linear of the decoder
# layers and leaves the embedding and LM head as they are.
QUANTIZED_BASE = tuple(n for n in quant.CONTRACTED if n not in ('embed_VD', 'lm_head_DV'))

# Attention q/k/v/o and the MLP, as PEFT's usual `target_modules` for Llama.
DEFAULT_TARGETS = r'(attn/(q_DNH|k_DKH|v_DKH|o_NHD)|mlp/(gate_DF|up_DF|down_FD))$'


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """rank r, alpha (scale = alpha / r), dropout on the adapter's input while training, and a regular
  expression searched in each parameter's path ('layers/attn/q_DNH'; unrolled layers:
  'layers/3/attn/q_DNH') choosing the weights to adapt. `base`: the model the adapters adapt (a
  Stoker workdir or a Hugging Face directory); training with a base set trains adapters only.
  `base_dtype='int8'`: QLoRA, the frozen base's decoder matrices held as int8 (models/quant.py,
  per output channel; the embedding and LM head stay as stored), a quarter of float32's bytes."""

  base: str = ''
  base_dtype: str = ''
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS
  rslora: bool = False

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f'lora.rank must be an integer >= 1; got {self.rank!r}.')
    if not self.alpha > 0:
      raise ValueError(f'lora.alpha must be > 0; got {self.alpha!r}.')
    if self.base_dtype not in ('',) + quant.WEIGHT_DTYPES:
      raise ValueError(f"lora.base_dtype must be '' (the base as stored) or one of {quant.WEIGHT_DTYPES} "
                       f'(QLoRA); got {self.base_dtype!r}.')
    if not 0 <= self.dropout < 1:
      raise ValueError(f'lora.dropout must be in [0, 1); got {self.dropout!r}.')
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f'lora.targets is not a regular expression ({e}): {self.targets!r}.') from None

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class Adapter(nnx.Variable):
  """A LoRA factor (a or b). Not an nnx.Param: filters that pick the model's params skip it."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
  """What an adapted weight Variable holds while the model runs: the base weight (an array, or an
  object with its own `einsum`, such as int8 weights) and the adapter. `key`: dropout's key, or None."""

  base: Any
  a: jax.Array
  b: jax.Array
  key: jax.Array | None = None
  scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  def einsum(self, spec: str, x: jax.Array, preferred_element_type=None) -> jax.Array:
    """einsum(spec, x, W) + scale * (x a) b, for a spec whose weight operand lists W's input axes
    first (every weight of the decoder: 'BTD,DNH->BTNH', 'BTNH,NHD->BTD', ...)."""
    x_sub, rest = spec.split(',')
    w_sub, out_sub = rest.split('->')
    n_in = self.a.ndim - 1
    in_sub, o_sub = w_sub[:n_in], w_sub[n_in:]
    keep = ''.join(c for c in x_sub if c not in in_sub)
    r = next(c for c in 'RZYXW' if c not in spec)
    y = einsum(spec, x, self.base, preferred_element_type=preferred_element_type)
    if self.key is not None and self.rate > 0:
      keep_mask = jax.random.bernoulli(self.key, 1 - self.rate, x.shape)
      x = jnp.where(keep_mask, x / (1 - self.rate), 0).astype(x.dtype)
    xa = jnp.einsum(f'{x_sub},{in_sub}{r}->{keep}{r}', x, self.a.astype(x.dtype))
    low = jnp.einsum(f'{keep}{r},{r}{o_sub}->{out_sub}', xa, self.b.astype(x.dtype),
                     preferred_element_type=preferred_element_type)
    return y + (self.scale * low).astype(y.dtype)


def input_dims(cfg: ModelConfig) -> dict[str, int]:
  """Weight name -> how many of its leading axes (after a stacked layer axis) are its input."""
  return {s.path[-1]: s.in_dims for s in hf.tensor_specs(cfg) if s.in_dims}


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _stacked(cfg: ModelConfig, path) -> int:
  """How many leading axes of the parameter at `path` stack layers (1 under scan_layers)."""
  return 1 if cfg.scan_layers and path[0] == 'layers' else 0


def targets(cfg: ModelConfig, params: nnx.State, lora: LoRAConfig) -> list[tuple]:
  """Paths of the weights `lora.targets` selects; ValueError if none, or if one is not a matrix."""
  dims = input_dims(cfg)
  chosen, seen = [], []
  for path, _ in nnx.to_flat_state(params):
    name = _name(path)
    seen.append(name)
    if re.search(lora.targets, name):
      if path[-1] not in dims or (path[-1] == 'embed_VD'):
        raise ValueError(f'lora.targets {lora.targets!r} selects {name}, which is not a weight matrix '
                         f'LoRA can adapt (those are: {", ".join(sorted(dims))}).')
      chosen.append(path)
  if not chosen:
    raise ValueError(f'lora.targets {lora.targets!r} matches no parameter. Parameter paths look like '
                     f'{", ".join(seen[:6])}, ...; the default is {DEFAULT_TARGETS!r}.')
  return chosen


def init_adapters(cfg: ModelConfig, params: nnx.State, lora: LoRAConfig, key: jax.Array) -> nnx.State:
  """Fresh adapters (a random, b zero) for the weights `lora.targets` selects. `params` may be
  abstract (jax.eval_shape): only shapes and logical axes are read."""
  dims, flat = input_dims(cfg), dict(nnx.to_flat_state(params))
  out = []
  for i, path in enumerate(targets(cfg, params, lora)):
    v = flat[path]
    lead, n_in = _stacked(cfg, path), dims[path[-1]]
    axes = tuple(v.get_metadata().get('out_sharding') or (None,) * len(v.shape))
    in_shape, out_shape = v.shape[lead:lead + n_in], v.shape[lead + n_in:]
    bound = 1 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(jax.random.fold_in(key, i), v.shape[:lead] + in_shape + (lora.rank,),
                           v.dtype, -bound, bound)
    b = jnp.zeros(v.shape[:lead] + (lora.rank,) + out_shape, v.dtype)
    out.append((path + ('lora_a',), Adapter(a, out_sharding=axes[:lead + n_in] + (None,),
                                                     eager_sharding=False)))
    out.append((path + ('lora_b',), Adapter(
        b, out_sharding=axes[:lead] + (None,) + axes[lead + n_in:], eager_sharding=False)))
  return nnx.from_flat_state(out)


def _pairs(adapters: nnx.State) -> dict[tuple, tuple[jax.Array, jax.Array]]:
  """Weight path -> (a, b) arrays."""
  flat = {p: v for p, v in nnx.to_flat_state(adapters)}
  return {p[:-1]: (flat[p[:-1] + ('lora_a',)].get_value(), flat[p[:-1] + ('lora_b',)].get_value())
          for p in flat if p[-1] == 'lora_a'}


def attach(cfg: ModelConfig, params: nnx.State, adapters: nnx.State, lora: LoRAConfig,
           dropout_key: jax.Array | None = None) -> nnx.State:
  """`params` with each adapted weight's Variable holding LoRA(base, a, b): what the model runs with
  (nnx.merge(graphdef, attach(...))). Dropout applies when `dropout_key` is given and the rate > 0."""
  pairs = _pairs(adapters)
  flat = list(nnx.to_flat_state(params))
  missing = sorted(_name(p) for p in set(pairs) - {p for p, _ in flat})
  if missing:
    raise ValueError(f'the adapters adapt weights this model does not have: {", ".join(missing[:6])}.')
  out = []
  for i, (path, v) in enumerate(flat):
    if path in pairs:
      a, b = pairs[path]
      key = None
      if dropout_key is not None and lora.dropout > 0:
        key = jax.random.fold_in(dropout_key, i)
        if _stacked(cfg, path):  # one key a layer: the scan over layers slices it
          key = jax.random.split(key, a.shape[0])
      v = v.replace(LoRA(v.get_value(), a, b, key, lora.scale, lora.dropout))
    out.append((path, v))
  return nnx.from_flat_state(out)


def delta(a: jax.Array, b: jax.Array, lead: int, scale: float) -> jax.Array:
  """scale * a b in the weight's own layout [lead..., I..., O...], in float32."""
  r = a.shape[-1]
  a2 = a.reshape(a.shape[:lead] + (-1, r)).astype(jnp.float32)
  b2 = b.reshape(b.shape[:lead] + (r, -1)).astype(jnp.float32)
  return (scale * (a2 @ b2)).reshape(a.shape[:-1] + b.shape[lead + 1:])


def quantize_base(params: nnx.State, lora: LoRAConfig) -> nnx.State:
  """The base as a run with `lora` trains over it: with base_dtype='int8' its decoder matrices as
  quant.WeightOnly (differentiable in the activations); otherwise `params` itself. Jit it to
  quantize on device."""
  if not lora.base_dtype:
    return params
  return quant.quantize_params(params, QUANTIZED_BASE, quant.WeightOnly)


def merge(cfg: ModelConfig, params: nnx.State, adapters: nnx.State, lora: LoRAConfig) -> nnx.State:
  """Params with every adapter folded in (W + scale a b, in W's dtype): a plain model again. Over
  an int8 base (QLoRA) W is the base the adapters were trained with: the int8 one, dequantized."""
  pairs = _pairs(adapters)
  trained = dict(nnx.to_flat_state(quantize_base(params, lora)))
  out = []
  for path, v in nnx.to_flat_state(params):
    w = v.get_value()
    base = trained[path].get_value()
    if isinstance(base, quant.Int8):
      v = v.replace(quant.dequantize_array(base, w.dtype))
    if path in pairs:
      v = v.replace((v.get_value().astype(jnp.float32)
                     + delta(*pairs[path], _stacked(cfg, path), lora.scale)).astype(w.dtype))
    out.append((path, v))
  return nnx.from_flat_state(out)
