"""Which functions JAX traces inside a block: the test of "this second call reuses a program"."""
import contextlib
from typing import Iterator, List

import jax


@contextlib.contextmanager
def traced_functions() -> Iterator[List[str]]:
  """Yields the list of function names JAX traces (jaxpr tracing, before any compile or cache
  lookup) while the block runs, in order."""
  names = []

  def on_event(event, duration, fun_name=None, **_):  # pylint: disable=unused-argument
    if event == "/jax/core/compile/jaxpr_trace_duration":
      names.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
