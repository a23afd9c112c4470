"""clusjax.parallel.cpu: its settings apply where steps run inline, and change no result.

The settings are per process (async dispatch is fixed when the backend starts), so
each case runs in a child process.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose 128 MiB intermediate (a [2048, 16384] float32 product that
# the second matmul reads) is a temporary of each call: minor page faults per call,
# and the result, for 10 calls after two warm-up calls.
_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from clusjax.parallel import cpu
if sys.argv[2] == "clusjax":
  cpu.run_inline()
import jax, jax.numpy as jnp, numpy as np
kept = cpu.keep_freed_memory()
f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)
rng = np.random.default_rng(0)
x, w, v = (rng.normal(size=s).astype(np.float32) for s in ((2048, 64), (64, 16384), (16384, 8)))
# On the device and ready, as the train loop makes its batches: a call that waits for
# an input runs on a worker thread.
x, w, v = jax.block_until_ready(jax.device_put((x, w, v)))
faults = []
for i in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  out = np.asarray(jax.block_until_ready(f(x, w, v)))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"inline": cpu.runs_inline(), "kept": kept, "faults": faults[2:], "sum": float(np.abs(out).sum())}))
"""


def _run(setting):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _CHILD, ROOT, setting], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_settings_apply_only_inline_and_keep_results():
  defaults, tuned = _run("defaults"), _run("clusjax")
  # keep_freed_memory sets glibc's options only where run_inline took effect: under
  # async dispatch the temporaries are allocated on XLA's threads, where it cannot help.
  assert defaults["kept"] is False and tuned["kept"] is True
  assert defaults["inline"] is False and tuned["inline"] is True   # what the loop reads
  temp_pages = 2048 * 16384 * 4 // 4096   # the intermediate's pages: 32,768
  # JAX's defaults map the temporary anew on every call and fault it back in.
  assert min(defaults["faults"]) > temp_pages // 2, defaults
  # With the settings, calls reuse the pages of the call before: here 6 to 10 of 10
  # (glibc's heap now and then places the block in fresh pages); the train step's own
  # figure, 0 faults per step against 347,000, is benchmarks/cpu_step_memory.py's.
  assert min(tuned["faults"]) < temp_pages // 20, tuned
  assert tuned["sum"] == defaults["sum"]   # the same executable, the same result
