"""Shared test set-up: two simulated CPU devices so that pmap paths are exercised."""
import os

# Must happen before JAX initialises its backends (i.e. before the first `import jax` in a test).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=2"
# The tests' arrays are tiny, so compiling dominates: without LLVM's backend optimisations XLA CPU compiles
# the tiny train step in 31 s instead of 47 s (measured on 2 cores); run time is irrelevant at these sizes.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# XLA's CPU compiler dominates this suite's time (a tiny NFNet's train step takes tens of seconds to
# compile on 2 cores). Many tests build the same computation through different Python closures, which
# the in-memory cache cannot see but the persistent cache (keyed by the HLO) can.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('NFNETS_TEST_JAX_CACHE', os.path.join(tempfile.gettempdir(), 'nfnets-jax-cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
