"""One agreed stop on preemption: every host checkpoints the same step, then exits cleanly.

The hosts of a TPU slice receive SIGTERM at different moments. If each stopped at the step where its own signal
arrived, one host would wait in the checkpoint's cross-host barrier while another waited in the next step's
collective, and neither would ever exit. In a multi-process run JAX's preemption service (started by
`jax.distributed.initialize`, which installs its own SIGTERM notifier) propagates the notice to all hosts and
agrees on the step at which all of them stop; a single process just watches for SIGTERM itself.
"""
import signal

from jax._src import distributed as jax_distributed  # the client handle; no public accessor exists
from jax.experimental import multihost_utils


class Watcher:
  """`with Watcher() as w: ... if w.reached(step): checkpoint and stop` — call `reached` at every step."""

  def __init__(self):
    self._multi_process = jax_distributed.global_state.client is not None
    self._signalled = False
    self._previous_handler = None

  def __enter__(self) -> 'Watcher':
    if not self._multi_process:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    """True at the step where this host (and, in a multi-process run, every host) must checkpoint and stop."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled
