"""Test-wide settings. 8 virtual CPU devices so that the sharding tests can build real meshes."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# PyPI's torchvision wheels do not load beside the CPU torch the tests use ("operator torchvision::nms does not
# exist"); transformers and diffusers probe for it at import. Marking it absent makes them skip it cleanly.
sys.modules.setdefault("torchvision", None)
