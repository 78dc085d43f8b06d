"""The mixture-of-experts MLP: a router sends each token to k of E SwiGLU experts.

The T x k (token, expert) assignments (X of them) are sorted by expert, so each expert's tokens
are one contiguous run, and the experts' matmuls are grouped matmuls over those runs:

- 'ragged_dot': `jax.lax.ragged_dot`, a grouped matmul on TPU. XLA:CPU lowers it to one dense
  [X, E*D] x [E*D, F] matmul over a masked copy of the tokens: every expert for every token, E
  times the work (measured, jax 0.10.2).
- 'megablox': Megablox's Pallas TPU kernel `gmm` (jax.experimental.pallas.ops.tpu.megablox, as
  MaxText's sparse matmul): row tiles of up to 128 (X padded to a whole tile), groups masked
  inside the kernel, its own VJP (`tgmm` for the weights' gradient). Off TPU it runs in Pallas'
  interpret mode: exact, slow, for tests.
- 'tiled': each expert's run is padded to a multiple of a tile of rows, so every tile belongs to
  one expert, and one batched matmul multiplies each tile by its expert's weights. Exact and
  dropless; under one tile of padding rows per expert, a bounded overhead (`tile_rows`).

Capacity-factor mode (capacity_factor > 0) routes each sequence apart (GShard's groups): each
expert gets C = ceil(cf * X / E) slots of a sequence's X assignments, and those past them are
dropped (the token keeps its other experts and the residual); the experts then run as one batched
[G, E, C, D] matmul (GShard/Switch).

Expert parallelism: expert weights carry the logical axis 'expert' (parallelism/rules.py maps it
to the 'expert' mesh axis). With a capacity the slots [G, E, C, D] are constrained from the batch's
sharding to ('expert_batch', 'expert'), and back after the experts: the partitioner compiles each
move to an all-to-all over 'expert', and every expert runs where its weights live (compiled HLO,
tests/parallelism/test_expert_parallel.py). Dropless, one sort spans the whole batch and the
partitioner gathers the tokens over 'expert' and sums the experts' outputs back with all-reduces:
the group sizes vary, so dispatch would need a ragged all-to-all, which XLA:CPU lacks. The router's
top-k gathers its logits (E floats a token) over the batch first: XLA:CPU does not split TopK.

Expert weights may be objects that multiply themselves (int8, models/quant.py): the tiled
and capacity paths hand them to models/layers.einsum.

Auxiliary losses: the load-balancing loss E * sum_e f_e * P_e (f_e: the fraction of tokens that
chose expert e, P_e: the mean router probability of e; Switch Transformer, and Hugging Face's
Mixtral `load_balancing_loss_func` for one layer), k when balanced; and the router z-loss, the
mean squared logsumexp of the router logits (ST-MoE).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import MLP, constrain, einsum, fan_in_init, param


def route(logits_TE: jax.Array, k: int, router: str, renormalize: bool):
  """(weights_TK float32, experts_TK int32): each token's k experts and their mixing weights."""
  logits_TE = logits_TE.astype(jnp.float32)
  if router == 'topk_softmax':
    top_TK, experts_TK = jax.lax.top_k(logits_TE, k)
    return jax.nn.softmax(top_TK, axis=-1), experts_TK
  weights_TK, experts_TK = jax.lax.top_k(jax.nn.softmax(logits_TE, axis=-1), k)
  if renormalize:
    weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
  return weights_TK, experts_TK


def load_balance_loss(logits_TE: jax.Array, experts_TK: jax.Array) -> jax.Array:
  """E * sum_e f_e * P_e: f_e the fraction of tokens routed to e, P_e its mean probability."""
  E = logits_TE.shape[-1]
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  chosen_E = jnp.sum(jax.nn.one_hot(experts_TK, E, dtype=jnp.float32), axis=(0, 1))
  return E * jnp.sum(chosen_E / logits_TE.shape[0] * jnp.mean(probs_TE, axis=0))


def router_z_loss(logits_TE: jax.Array) -> jax.Array:
  """Mean over tokens of logsumexp(router logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def tile_rows(num_rows: int, num_experts: int) -> int:
  """Rows per tile of the tiled grouped matmul: a power of two, at most 128, at least 8, with
  padding (under one tile per expert) within half the rows. Fewer, larger tiles gather fewer
  copies of the weights: on tiny_moe (2048 rows, 8 experts) tiles of 128 rows trained at 0.84x
  dense, of 64 at 0.70x, of 32 at 0.58x, of 256 at 0.76x (benchmarks/moe.py, 2 CPU cores)."""
  target = max(8, num_rows // (2 * num_experts))
  return min(128, 1 << (target.bit_length() - 1))


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """Where sorted rows go in the padded, tiled layout. R = n * b padded rows in n tiles of b."""

  src_R: jax.Array  # int32: the sorted row each padded row takes (clipped)
  valid_R: jax.Array  # bool: False for padding rows
  dest_X: jax.Array  # int32: each sorted row's padded row
  expert_n: jax.Array  # int32: each tile's expert
  b: int


def _tiles(group_sizes_E: jax.Array, X: int, b: int) -> _Tiles:
  E = group_sizes_E.shape[0]
  n = -(-X // b) + E  # sum_e ceil(g_e / b) <= ceil(X / b) + E - 1
  sizes_E = group_sizes_E.astype(jnp.int32)
  padded_E = -(-sizes_E // b) * b
  start_E, pstart_E = jnp.cumsum(sizes_E) - sizes_E, jnp.cumsum(padded_E) - padded_E
  rows_R = jnp.arange(n * b, dtype=jnp.int32)
  # The expert of each padded row (rows past the last tile fall to the last expert, as padding).
  e_R = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), rows_R, side='right'), E - 1)
  rank_R = rows_R - pstart_E[e_R]
  valid_R = rank_R < sizes_E[e_R]
  src_R = jnp.clip(start_E[e_R] + rank_R, 0, max(X - 1, 0))
  rows_X = jnp.arange(X, dtype=jnp.int32)
  e_X = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes_E), rows_X, side='right'), E - 1)
  dest_X = pstart_E[e_X] + rows_X - start_E[e_X]
  return _Tiles(src_R, valid_R, dest_X, e_R[::b], b)


def _to_tiles(x_XD: jax.Array, t: _Tiles) -> jax.Array:
  x_RD = jnp.where(t.valid_R[:, None], jnp.take(x_XD, t.src_R, axis=0), 0)
  return x_RD.reshape(-1, t.b, x_XD.shape[-1])


def _tile_matmul(x_nbD, w_EDF, t: _Tiles):
  """Each tile times its expert's weights. A weight object (serving's int8) gathers its experts
  itself (`take`) and multiplies through layers.einsum, staying int8."""
  if hasattr(w_EDF, 'einsum'):
    return einsum('nbD,nDF->nbF', x_nbD, w_EDF.take(t.expert_n))
  return jnp.einsum('nbD,nDF->nbF', x_nbD, jnp.take(w_EDF.astype(x_nbD.dtype), t.expert_n, axis=0))


def _megablox(x_XD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  """grouped_matmul by Megablox's gmm: rows padded to a whole tile (of up to 128, a multiple of 8),
  the rows past the groups (which the kernel leaves unwritten) zeroed."""
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # pylint: disable=g-import-not-at-top
  X, D = x_XD.shape
  F = w_EDF.shape[-1]
  tm = min(128, -(-X // 8) * 8)
  padded = -(-X // tm) * tm
  y_XF = gmm(jnp.pad(x_XD, ((0, padded - X), (0, 0))), w_EDF.astype(x_XD.dtype),
             group_sizes_E.astype(jnp.int32), x_XD.dtype, (tm, min(128, D), min(128, F)),
             interpret=jax.default_backend() != 'tpu')[:X]
  return jnp.where((jnp.arange(X) < jnp.sum(group_sizes_E))[:, None], y_XF, 0)


def grouped_matmul(x_XD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array,
                   impl: str = 'tiled', tile: int | None = None) -> jax.Array:
  """Row block e of x (rows sorted by group, group e being group_sizes_E[e] rows) times w[e].

  Rows past sum(group_sizes_E) come back as zeros."""
  if impl == 'ragged_dot':
    return jax.lax.ragged_dot(x_XD, w_EDF.astype(x_XD.dtype), group_sizes_E.astype(jnp.int32))
  if impl == 'megablox':
    return _megablox(x_XD, w_EDF, group_sizes_E)
  X, E = x_XD.shape[0], w_EDF.shape[0]
  t = _tiles(group_sizes_E, X, tile or tile_rows(X, E))
  y_nbF = _tile_matmul(_to_tiles(x_XD, t), w_EDF, t)
  y_XF = jnp.take(y_nbF.reshape(-1, y_nbF.shape[-1]), t.dest_X, axis=0)
  return jnp.where((jnp.arange(X) < jnp.sum(group_sizes_E))[:, None], y_XF, 0)


class MoE(nnx.Module):
  """Router + E SwiGLU experts (+ optional shared experts). `__call__(x) -> y` like the dense MLP
  (serving calls it so); `with_aux(x) -> (y, aux)` also returns the router's losses and loads."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, E, F, pdt = cfg.d_model, cfg.num_experts, cfg.expert_mlp_dim, cfg.param_dtype
    self.cfg = cfg
    self.router_DE = param(rngs, fan_in_init(D), (D, E), ('embed', None), pdt)
    self.gate_EDF = param(rngs, fan_in_init(D), (E, D, F), ('expert', 'embed', 'mlp'), pdt)
    self.up_EDF = param(rngs, fan_in_init(D), (E, D, F), ('expert', 'embed', 'mlp'), pdt)
    self.down_EFD = param(rngs, fan_in_init(F), (E, F, D), ('expert', 'mlp', 'embed'), pdt)
    self.shared = nnx.data(None)
    if cfg.shared_mlp_dim:
      self.shared = MLP(dataclasses.replace(cfg, mlp_dim=cfg.shared_mlp_dim), rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.with_aux(x_BTD)[0]

  def with_aux(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None):
    """(y_BTD, aux): aux holds 'load_balance' and 'router_z' (float32 scalars) and
    'expert_tokens' (float32 [E], the assignments each expert received; with `valid_BT`, those of
    the tokens where it is True only: serving's padding tokens are routed but are not load)."""
    cfg = self.cfg
    B, T, D = x_BTD.shape
    E, k = cfg.num_experts, cfg.experts_per_token
    # Groups route and sort apart: the whole batch when dropless, each sequence with a capacity.
    G = B if cfg.capacity_factor else 1
    x_GSD = x_BTD.reshape(G, B * T // G, D)
    logits_GSE = einsum('GSD,DE->GSE', x_GSD, self.router_DE.get_value(),
                        preferred_element_type=jnp.float32)
    logits_GSE = constrain(logits_GSE, ('batch', None, None) if G > 1 else (None, 'batch', None))
    weights_GSK, experts_GSK = route(logits_GSE, k, cfg.router, cfg.router_renormalize)
    # Sort each group's X = S * k assignments by expert (stable: tokens keep their order within one).
    experts_GX = experts_GSK.reshape(G, -1)
    order_GX = jnp.argsort(experts_GX, axis=-1, stable=True)
    xs_GXD = jnp.take_along_axis(x_GSD, (order_GX // k)[..., None], axis=1)
    sizes_GE = jax.vmap(functools.partial(jnp.bincount, length=E))(experts_GX)
    if cfg.capacity_factor:
      ys_GXD = self._capacity(xs_GXD, sizes_GE)
    else:
      ys_GXD = self._dropless(xs_GXD[0], sizes_GE[0])[None]
    y_GXD = jnp.take_along_axis(ys_GXD, jnp.argsort(order_GX, axis=-1)[..., None], axis=1)
    y_GSKD = y_GXD.reshape(G, -1, k, D)
    y_BTD = jnp.einsum('GSKD,GSK->GSD', y_GSKD, weights_GSK.astype(y_GSKD.dtype)).reshape(B, T, D)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    logits_TE, experts_TK = logits_GSE.reshape(-1, E), experts_GSK.reshape(-1, k)
    if valid_BT is None:
      tokens_E = jnp.sum(sizes_GE, axis=0).astype(jnp.float32)
    else:
      valid_TK = jnp.broadcast_to(valid_BT.reshape(-1, 1), experts_TK.shape)
      tokens_E = jnp.bincount(experts_TK.reshape(-1), valid_TK.reshape(-1).astype(jnp.float32),
                              length=E)
    aux = {'load_balance': load_balance_loss(logits_TE, experts_TK),
           'router_z': router_z_loss(logits_TE), 'expert_tokens': tokens_E}
    return y_BTD, aux

  def _impl(self) -> str:
    impl = self.cfg.grouped_matmul
    if impl == 'auto':
      return 'ragged_dot' if jax.default_backend() == 'tpu' else 'tiled'
    return impl

  def _dropless(self, xs_XD, sizes_E):
    gate, up, down = (w.get_value() for w in (self.gate_EDF, self.up_EDF, self.down_EFD))
    impl = self._impl()
    if impl in ('ragged_dot', 'megablox'):
      if hasattr(gate, 'einsum'):
        raise ValueError("Quantized expert weights run with grouped_matmul='tiled' or in "
                         f"capacity-factor mode, not with {impl!r}.")
      h_XF = (jax.nn.silu(grouped_matmul(xs_XD, gate, sizes_E, impl)) *
              grouped_matmul(xs_XD, up, sizes_E, impl))
      return grouped_matmul(h_XF, down, sizes_E, impl)
    # Tiled: pad once, run the three matmuls tile by tile, unpad once.
    X = xs_XD.shape[0]
    t = _tiles(sizes_E, X, tile_rows(X, self.cfg.num_experts))
    x_nbD = _to_tiles(xs_XD, t)
    h_nbF = jax.nn.silu(_tile_matmul(x_nbD, gate, t)) * _tile_matmul(x_nbD, up, t)
    y_nbD = _tile_matmul(h_nbF, down, t)
    return jnp.take(y_nbD.reshape(-1, y_nbD.shape[-1]), t.dest_X, axis=0)

  def _capacity(self, xs_GXD, sizes_GE):
    """Each group's sorted assignments into [E, C] slots, the experts run as one batched matmul over
    [G, E, C, D], and back. Between the two layouts the slots move from their group's devices to
    their expert's: all-to-alls over 'expert' (see the module doc)."""
    G, X, D = xs_GXD.shape
    E = self.cfg.num_experts
    C = max(1, math.ceil(self.cfg.capacity_factor * X / E))
    slot_C = jnp.arange(C)

    def gather(xs_XD, sizes_E):
      start_E = jnp.cumsum(sizes_E) - sizes_E
      valid_EC = slot_C[None, :] < sizes_E[:, None]
      src_EC = jnp.clip(start_E[:, None] + slot_C[None, :], 0, X - 1)
      return jnp.where(valid_EC[..., None], jnp.take(xs_XD, src_EC, axis=0), 0)

    def scatter(y_ECD, sizes_E):
      # Each sorted assignment's slot; those past the capacity were dropped (zero output).
      start_E = jnp.cumsum(sizes_E) - sizes_E
      e_X = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes_E), jnp.arange(X), side='right'), E - 1)
      rank_X = jnp.arange(X) - start_E[e_X]
      y_XD = y_ECD[e_X, jnp.minimum(rank_X, C - 1)]
      return jnp.where((rank_X < C)[:, None], y_XD, 0)

    x_GECD = constrain(jax.vmap(gather)(xs_GXD, sizes_GE), ('batch', None, None, 'act_embed'))
    experts = ('expert_batch', 'expert', None, 'act_embed')
    x_GECD = constrain(x_GECD, experts)  # all-to-all
    h_GECF = (jax.nn.silu(einsum('GECD,EDF->GECF', x_GECD, self.gate_EDF.get_value())) *
              einsum('GECD,EDF->GECF', x_GECD, self.up_EDF.get_value()))
    y_GECD = constrain(einsum('GECF,EFD->GECD', h_GECF, self.down_EFD.get_value()), experts)
    y_GECD = constrain(y_GECD, ('batch', None, None, 'act_embed'))  # all-to-all back
    return jax.vmap(scatter)(y_GECD, sizes_GE)
