"""Int8 for serving: the int8 KV cache (per token, per head), and the int8 weights' shardings.

The int8 weights themselves (Int8, the W8A8 product, quantize_params) live in models/quant.py, below
train/ and serve/, since QLoRA trains over an int8 base; serve/ reaches them through this module.

KV cache. Keys and values are written as int8 with a float32 scale per (token, kv head):
  scale = max |k| over the head dim / 127. Pages [L, P, G, K, H] int8 + scales [L, P, G, K].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from models.quant import (CONTRACTED, WEIGHT_DTYPES, Int8, abstract, dequantize,  # noqa: F401
                          dequantize_array, einsum, model_layout, nbytes, out_major_params,
                          quantize, quantize_params)
from parallelism import sharding
from parallelism.rules import DEFAULT_RULES, Rules


def logical_shardings(abstract_quantized: nnx.State, mesh: Mesh,
                      rules: Rules = DEFAULT_RULES) -> nnx.State:
  """Shardings by the Variables' logical axes, for q and scale alike (a size-1 scale axis is
  replicated): parallelism.sharding.logical_shardings, which maps a Variable's value leaf by leaf."""
  return sharding.logical_shardings(abstract_quantized, mesh, rules)


# ---- KV cache.

def quantize_kv(x_TKH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(int8 [T, K, H], float32 scales [T, K]): one scale per token and kv head."""
  q = quantize(x_TKH, (2,))
  return q.q, q.scale[..., 0]


def dequantize_kv(q_XGKH: jax.Array, scale_XGK: jax.Array, dtype) -> jax.Array:
  return (q_XGKH.astype(jnp.float32) * scale_XGK[..., None]).astype(dtype)
