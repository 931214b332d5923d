"""Rectified-flow Euler sampling with classifier-free guidance, reference-frame injection and autoregressive long
video (cvd_storm_official.md §1.8: OpenDWM ``ctsd.py`` ``inference_pipeline`` / ``autoregressive_inference_pipeline``).

Everything here is a pure function of a velocity field

  velocity_fn(x_t [B', T, V, h, w, C], timesteps [B', T, V] (sigma * 1000; 0 on reference frames), uncond bool [B'])
    -> v [B', T, V, h, w, C]

where ``uncond`` says per batch entry whether the unconditional branch (empty prompt, grey layouts, same cameras and
references) is wanted. With guidance the sampler calls it ONCE on the doubled batch [cond; uncond] (B' = 2B), as
OpenDWM's pipeline does, so the model sees one program of twice the batch rather than two calls; the caller tiles its
conditions to 2B accordingly (as ``generate.py`` does).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from cvd_storm_jax.diffusion import rectified_flow as rf

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def branch_uncond(batch_size: int, guidance: float) -> jax.Array:
  """The ``uncond`` flags with which ``guided_velocity`` calls velocity_fn: [False] * B + [True] * B with guidance,
  [False] * B without (g == 1). A caller that computes its conditions once per window lays them out by these."""
  if guidance == 1.0:
    return jnp.zeros((batch_size,), bool)
  return jnp.concatenate([jnp.zeros((batch_size,), bool), jnp.ones((batch_size,), bool)])


def guided_velocity(velocity_fn: VelocityFn, x: jax.Array, timesteps: jax.Array, guidance: float) -> jax.Array:
  """uncond + g * (cond - uncond) from one call on [x; x]; g == 1 calls the conditional branch only."""
  b = x.shape[0]
  uncond = branch_uncond(b, guidance)
  if guidance == 1.0:
    return velocity_fn(x, timesteps, uncond).astype(jnp.float32)
  both = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([timesteps, timesteps]), uncond).astype(jnp.float32)
  cond, uncond = both[:b], both[b:]
  return uncond + guidance * (cond - uncond)


def _reference_slots(shape: tuple[int, ...], reference: Optional[jax.Array],
                     reference_mask: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(clean [B, T, V, h, w, C] with the references in the first k frames, is_ref bool [B, T, V])."""
  B, T, V = shape[:3]
  if reference is None:
    if reference_mask is not None:
      raise ValueError("reference_mask given without reference")
    return jnp.zeros(shape, jnp.float32), jnp.zeros((B, T, V), bool)
  k = reference.shape[1]
  if reference.ndim != 6 or reference.shape[0] != B or reference.shape[2:] != shape[2:]:
    raise ValueError(f"reference has shape {reference.shape}; expected [B={B}, k, V, h, w, C] matching the noise "
                     f"{shape}")
  if not 0 < k < T:
    raise ValueError(f"reference has k={k} frames; need 0 < k < T={T} (the window must generate something)")
  mask = jnp.ones((B, k, V), bool) if reference_mask is None else jnp.asarray(reference_mask, bool)
  if mask.shape != (B, k, V):
    raise ValueError(f"reference_mask has shape {mask.shape}; expected [B, k, V] = {(B, k, V)}")
  clean = jnp.zeros(shape, jnp.float32).at[:, :k].set(reference.astype(jnp.float32))
  is_ref = jnp.zeros((B, T, V), bool).at[:, :k].set(mask)
  return clean, is_ref


def sample(velocity_fn: VelocityFn, noise: jax.Array, *, num_steps: int, shift: float = 3.0, guidance: float = 4.0,
           reference: Optional[jax.Array] = None, reference_mask: Optional[jax.Array] = None) -> jax.Array:
  """Euler from pure noise over ``sampling_sigmas(num_steps, shift)`` (FlowMatchEulerDiscreteScheduler).

  Args:
    velocity_fn: see the module docstring.
    noise: [B, T, V, h, w, C] standard normal (x at sigma = 1).
    reference: [B, k, V, h, w, C] clean latents of the first k frames, or None (generation). At every step they
      overwrite the first k frames and get timestep 0; the output keeps them (OpenDWM).
    reference_mask: bool [B, k, V]: which reference (frame, view) slots are clean (default all); the others are
      generated like any frame.
  Returns:
    latents [B, T, V, h, w, C] float32.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps}; need >= 1")
  if noise.ndim != 6:
    raise ValueError(f"noise has shape {noise.shape}; expected [B, T, V, h, w, C]")
  clean, is_ref = _reference_slots(noise.shape, reference, reference_mask)
  ref6 = is_ref[..., None, None, None]
  sigmas = rf.sampling_sigmas(num_steps, shift=shift)

  def body(i, x):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x = jnp.where(ref6, clean, x)
    timesteps = jnp.where(is_ref, 0.0, sigma * rf.NUM_TRAIN_TIMESTEPS)
    v = guided_velocity(velocity_fn, x, timesteps, guidance)
    return rf.euler_step(x, v, sigma, sigma_next)

  x = jax.lax.fori_loop(0, num_steps, body, noise.astype(jnp.float32))
  return jnp.where(ref6, clean, x)


def window_starts(num_frames: int, *, window: int, num_reference: int) -> list[int]:
  """Start frames of the autoregressive windows; raises unless (num_frames - k) % (window - k) == 0 (OpenDWM #39)."""
  k = num_reference
  if not 0 <= k < window:
    raise ValueError(f"num_reference={k} must be in [0, window={window})")
  if num_frames < window or (num_frames - k) % (window - k):
    raise ValueError(f"num_frames={num_frames} does not tile into windows of {window} frames overlapping by {k}: "
                     f"need num_frames >= {window} and (num_frames - {k}) % ({window} - {k}) == 0, e.g. "
                     f"{window}, {2 * window - k}, {3 * window - 2 * k}")
  stride = window - k
  return list(range(0, num_frames - window + 1, stride))


SampleWindowFn = Callable[[int, jax.Array, Optional[jax.Array]], jax.Array]


def autoregressive(sample_window: SampleWindowFn, noise: jax.Array, *, window: int = 19, num_reference: int = 3,
                   reference: Optional[jax.Array] = None) -> jax.Array:
  """Long video in windows of ``window`` frames, each started every ``window - num_reference`` frames.

  Args:
    sample_window: (start, noise [B, window, V, h, w, C], reference [B, k, V, h, w, C] or None) -> latents of frames
      [start, start + window). The caller slices its conditions (captions, layouts, cameras) to that range and feeds
      frame indices 0..window-1 (the model's frame embedding restarts per window), e.g. ``sample`` with a
      velocity_fn over the sliced batch.
    noise: [B, num_frames, V, h, w, C]; window i uses its slice (its first k frames are overwritten by references).
    num_reference: k, the latents carried from the previous window's output (no re-encoding).
    reference: [B, k, V, h, w, C] ground-truth latents for the first window (prediction), or None: the first window is
      generated from 0 references.
  Returns:
    latents [B, num_frames, V, h, w, C]; the overlap frames are the carried references, unchanged.
  """
  num_frames = noise.shape[1]
  starts = window_starts(num_frames, window=window, num_reference=num_reference)
  if reference is not None and reference.shape[1] != num_reference:
    raise ValueError(f"reference has {reference.shape[1]} frames; expected num_reference={num_reference}")
  pieces, ref = [], reference
  for i, s in enumerate(starts):
    out = sample_window(s, noise[:, s:s + window], ref)
    if out.shape != noise[:, s:s + window].shape:
      raise ValueError(f"sample_window returned {out.shape}; expected {noise[:, s:s + window].shape}")
    # The first window is kept whole; later windows drop their k reference frames (already in the previous piece).
    pieces.append(out if i == 0 else out[:, num_reference:])
    ref = out[:, window - num_reference:] if num_reference else None
  return jnp.concatenate(pieces, axis=1)
