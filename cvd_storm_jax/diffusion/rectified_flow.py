"""Rectified flow as SD3 trains and samples it (diffusers FlowMatchEulerDiscreteScheduler semantics, shift 3).

Convention: sigma in [0, 1]; x_t = sigma * eps + (1 - sigma) * x0; the model predicts the velocity
v = dx_t/dsigma = eps - x0; the model's timestep input is sigma * 1000.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: jax.Array, shift: float) -> jax.Array:
  """SD3's resolution shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_training_sigmas(rng: jax.Array, shape: tuple[int, ...], *, shift: float = 3.0, logit_mean: float = 0.0,
                           logit_std: float = 1.0) -> jax.Array:
  """Logit-normal timesteps on the discrete shifted training grid, as SD3 / OpenDWM train.

  u = sigmoid(N(mean, std)); index = floor(u * 1000) into the scheduler's descending timesteps 1000..1; sigma is the
  shifted sigma of that timestep. Returns float32 sigmas in (0, 1], of ``shape``.
  """
  u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, shape))
  index = jnp.clip(jnp.floor(u * NUM_TRAIN_TIMESTEPS), 0, NUM_TRAIN_TIMESTEPS - 1)
  timestep = NUM_TRAIN_TIMESTEPS - index  # descending grid: index 0 -> timestep 1000
  return shift_sigma(timestep / NUM_TRAIN_TIMESTEPS, shift).astype(jnp.float32)


def add_noise(x0: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
  """x_t = sigma * eps + (1 - sigma) * x0 (sigma broadcast against x0 from the left)."""
  sigma = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))
  return sigma * eps + (1.0 - sigma) * x0


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
  return eps - x0


def per_element_loss(v_pred: jax.Array, x0: jax.Array, eps: jax.Array, sigma: jax.Array, *,
                     form: str = "velocity") -> jax.Array:
  """Squared error per element.

  form="velocity": ||v - (eps - x0)||^2 (paper Eq. 4, which writes the target as z0 - eps: the opposite sign of
  SD3.5's weights, diffusers and OpenDWM, which this follows). form="x0": ||x_t - sigma v - x0||^2
  = sigma^2 ||v - (eps - x0)||^2 (OpenDWM / diffusers SD3 "precondition_outputs").
  """
  err = v_pred.astype(jnp.float32) - velocity_target(x0, eps).astype(jnp.float32)
  if form == "velocity":
    return jnp.square(err)
  if form == "x0":
    s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim)).astype(jnp.float32)
    return jnp.square(s * err)
  raise ValueError(f"unknown rectified-flow loss form {form!r}; expected 'velocity' or 'x0'")


def sampling_sigmas(num_steps: int, *, shift: float = 3.0) -> jax.Array:
  """The Euler sampler's sigma grid (num_steps + 1 values, ending at 0), as FlowMatchEulerDiscreteScheduler
  .set_timesteps(num_steps) builds it: a linear grid between the (already shifted) extreme training sigmas, shifted
  once more."""
  sigma_max, sigma_min = 1.0, float(shift_sigma(1.0 / NUM_TRAIN_TIMESTEPS, shift))
  t = jnp.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
  sigmas = shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift)
  return jnp.concatenate([sigmas, jnp.zeros((1,))]).astype(jnp.float32)


def euler_step(x: jax.Array, v: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
  return x + (sigma_next - sigma) * v
