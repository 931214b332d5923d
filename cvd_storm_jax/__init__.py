"""cvd_storm_jax: CVD-STORM (multi-view driving video diffusion + STORM-VAE) in JAX/Flax."""

__version__ = "0.1.0"
