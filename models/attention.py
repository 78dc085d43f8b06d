"""Causal self-attention that respects segment ids, behind one enum of implementations.

Segment ids mark packed documents: a token attends only to earlier-or-equal positions of its own
segment. Segment id 0 is padding by convention; padding rows still see themselves, so no row
of the softmax is empty and nothing turns into NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import AttentionImpl

# Dimension letters as in DESIGN.md, plus R: query heads per key/value head (N // K).


def attention_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T, S] True where query t may attend to key s: same segment and s <= t."""
  T = segment_ids_BT.shape[1]
  causal_TS = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return same_BTS & causal_TS[None]


def xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, scale: float) -> jax.Array:
  """The reference: einsums, a boolean mask and a float32 softmax. Grouped heads are not copied."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKRH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKRTS = jnp.einsum('BTKRH,BSKH->BKRTS', q_BTKRH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  mask_BTS = attention_mask(segment_ids_BT)
  logits_BKRTS = jnp.where(mask_BTS[:, None, None], logits_BKRTS, jnp.finfo(jnp.float32).min)
  probs_BKRTS = jax.nn.softmax(logits_BKRTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKRH = jnp.einsum('BKRTS,BSKH->BTKRH', probs_BKRTS, v_BSKH)
  return out_BTKRH.reshape(B, T, N, H)


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, scale: float) -> jax.Array:
  """cuDNN fused attention (GPU, bf16/f16). The segment mask is passed as an explicit mask."""
  if jax.default_backend() != 'gpu':
    raise ValueError("attention='cudnn' needs a GPU backend; use attention='xla' on "
                     f"{jax.default_backend()!r}.")
  mask_B1TS = attention_mask(segment_ids_BT)[:, None]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, scale=scale,
                                      implementation='cudnn')


def resolve(impl: AttentionImpl, platform: str, dtype, seq_len: int) -> AttentionImpl:
  """What AUTO means here. All implementations compute the same function (see the tests):
  the choice only changes speed. cuDNN needs 16-bit inputs; splash needs T % 128 == 0."""
  if impl != AttentionImpl.AUTO:
    return impl
  if platform == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return AttentionImpl.CUDNN
  if platform == 'tpu' and seq_len % 128 == 0:
    return AttentionImpl.SPLASH
  return AttentionImpl.XLA


def attend(impl: AttentionImpl, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT) -> jax.Array:
  """Dispatches to the chosen implementation; all take and return the same layouts."""
  scale = q_BTNH.shape[-1] ** -0.5
  impl = resolve(impl, jax.default_backend(), q_BTNH.dtype, q_BTNH.shape[1])
  if impl == AttentionImpl.XLA:
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, scale)
  if impl == AttentionImpl.CUDNN:
    return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, scale)
  if impl == AttentionImpl.SPLASH:
    from models import splash  # pylint: disable=g-import-not-at-top  (TPU-only dependency)
    return splash.splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, scale)
  raise ValueError(f'Unknown attention implementation {impl!r}.')
