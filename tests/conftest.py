"""Shared test set-up: two simulated CPU devices so that pmap paths are exercised."""
import os

# Must happen before JAX initialises its backends (i.e. before the first `import jax` in a test).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
