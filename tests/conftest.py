"""Test-wide settings. 8 virtual CPU devices so that the sharding tests can build real meshes."""
import os
import sys
import tempfile

# XLA's CPU backend optimisations off: the suite is bound by compiling (most programs run a few times), and level 0
# compiles about 4x faster. The few loops that run hundreds of steps ask for the default level on their own jit
# (``compiler_options=_configs.RUN_FAST``; a per-jit option overrides this flag).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A persistent XLA compilation cache shared by the xdist workers and the CLI subprocesses: the trainer tests compile
# the same step in several train() calls (a resume is a new call). Entries are keyed by the program, the compile
# options and the jax/jaxlib versions, so a stale entry is never used; the size cap evicts old ones.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cvd_storm_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))

# PyPI's torchvision wheels do not load beside the CPU torch the tests use ("operator torchvision::nms does not
# exist"); transformers and diffusers probe for it at import. Marking it absent makes them skip it cleanly.
sys.modules.setdefault("torchvision", None)
