"""Shared test set-up: two simulated CPU devices so that pmap paths are exercised."""
import os

# Must happen before JAX initialises its backends (i.e. before the first `import jax` in a test).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=2"
# The tests' arrays are tiny, so compiling dominates: without LLVM's backend optimisations XLA CPU compiles
# the tiny train step in 8.5 s instead of 11.4 s, though it then runs in 143 ms instead of 26 ms (2 cores,
# jax 0.10.2; docs/testing.md has the trade-off).
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from nfnets.studies import sweeps  # pylint: disable=g-import-not-at-top,wrong-import-position

# XLA's CPU compiler dominates this suite's time (hundreds of programs, seconds each on 2 cores). Many tests build the same computation through different Python closures, which
# the in-memory cache cannot see but the persistent cache (keyed by the HLO) can.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('NFNETS_TEST_JAX_CACHE', os.path.join(tempfile.gettempdir(), 'nfnets-jax-cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

# Every program XLA CPU compiles keeps its code in memory mappings of its own (the tiny train step: ~2,600)
# for as long as JAX's caches hold it. One process compiling the whole suite passes Linux's limit of 65,530
# mappings (vm.max_map_count), and the next compile or cache write segfaults. Drop the compiled programs
# once a test leaves the process near the limit.
_MAPPINGS = '/proc/self/maps'
_MAPPINGS_TO_CLEAR_AT = 30_000


def _mapping_count() -> int:
  with open(_MAPPINGS, 'rb') as f:
    return sum(1 for _ in f)


@pytest.fixture(autouse=True)
def _release_compiled_programs_near_the_mapping_limit():
  yield
  if os.path.exists(_MAPPINGS) and _mapping_count() > _MAPPINGS_TO_CLEAR_AT:
    sweeps.release_compiled_programs()
