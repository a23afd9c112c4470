"""The CPU backend's settings: a step's temporaries reused, not mapped anew each call.

XLA:CPU allocates an executable's temporaries on every call (1.35 GB per `:tiny`
train step). Dispatched asynchronously, the call runs on one of XLA's threads, and
that thread's glibc arena cannot hold a block so large: glibc maps it fresh (mmap)
and unmaps it when it is freed, so every step page-faults all of it back in (~350k
faults, about a quarter of a `:tiny` step on 2 cores). Run inline (`run_inline`,
which launch/main.py calls: in the calling thread, whose arena is the main one) with
freed memory kept in the process (`keep_freed_memory`, which the train loop calls
after compiling), each step reuses the pages of the one before: `:tiny`'s step 1.38
-> 1.03 s (benchmarks/cpu_step_memory.py). The executable, and so every result, is
the same. A call runs inline only when its inputs are ready, so the train loop waits
for each batch's arrays before the step (`_global_batch` in clusjax/train/loop.py).
"""
import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
# The largest value mallopt takes (an int): the heap's free top is given back to the
# system only beyond it, and then only down to it, so a step's temporaries up to 2 GB
# stay in the process between steps.
_KEEP_BYTES = 2**31 - 1


def run_inline():
  """Before JAX's backends start: the CPU backend runs single-device computations in
  the calling thread (its async dispatch off). Other backends are not affected."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_enable_async_dispatch", False)


def runs_inline():
  """Whether `run_inline` took effect: a CPU backend with its async dispatch off."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend() == "cpu" and not jax.config.read(
      "jax_cpu_enable_async_dispatch")


def keep_freed_memory():
  """Where `run_inline` took effect (a CPU backend started after it): freed memory stays
  in the process for the next allocation. Large blocks come from the heap, not a
  mapping of their own, and the heap keeps up to 2 GB of free top (a trim leaves 2 GB),
  so the next step's temporaries fit where the last one's were. Set it after compiling:
  XLA's compiles are slower with it (`:tiny`'s start-up by ~3 s). glibc only; returns
  whether it was set (False on other backends, under async dispatch, and on other C
  libraries)."""
  if not runs_inline():
    return False   # async dispatch allocates on XLA's threads, where this does not help
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
  except (OSError, AttributeError, TypeError):   # no C library found, or not glibc's
    return False
  return all(mallopt(key, value) for key, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES), (_M_TOP_PAD, _KEEP_BYTES)))
