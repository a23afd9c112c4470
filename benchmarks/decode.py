"""Caption decoding speed: tokens per second with and without the key-value cache.

    nice -n 10 python benchmarks/decode.py [--config=configs/caption.py:tiny]
        [--batch_sizes=1,64] [--max_len=32] [--methods=greedy,beam] [--repeats=3]

Builds the config's ClusModel (random init: speed does not depend on the weights;
[SEP] is made impossible so every caption runs max_len tokens) and, for each
method x batch size x cache on / off, compiles `clusjax.models.decode.caption_decoder`
under jax.jit and reports the compile time and the median of --repeats timed calls
after one warm-up call: tokens/s = batch x max_len / seconds (beam search counts the
returned tokens, not the beams'). The text tower's position table is widened to
max_len + 1 when the config's is shorter. Prints a Markdown table for
benchmarks/RESULTS.md.
"""
import datetime
import os
import platform
import statistics
import sys
import time

from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from clusjax.cli import parse_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "caption.py") + ":tiny",
    "Config file (path[:variant]).", lock_config=False)
_BATCH = flags.DEFINE_list("batch_sizes", "1,64", "Batch sizes.")
_MAX_LEN = flags.DEFINE_integer("max_len", 32, "Tokens decoded per caption.")
_METHODS = flags.DEFINE_list("methods", "greedy,beam", "greedy | beam (beam_size 3).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per case (median).")


def main(argv):
  parse_flags(argv, required={})
  import jax
  import jax.numpy as jnp
  import numpy as np

  from clusjax.models.clus import build_model
  from clusjax.models.decode import caption_decoder
  from clusjax.train.objective import TextIds

  config = _CONFIG.value
  max_len = _MAX_LEN.value
  config.data.max_text_len = max(config.data.max_text_len, max_len + 1)
  vocab = config.data.vocab_size
  text_ids = TextIds(cls_id=2, sep_id=3, mask_id=4, vocab_size=vocab, first_random_id=5)
  model = build_model(config, vocab)
  size = config.data.image_size
  ids = jnp.zeros((1, config.data.max_text_len), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8), ids,
                               jnp.ones_like(ids, bool))["params"]
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  bias = params["mlm_decoder"]["bias"]
  params["mlm_decoder"]["bias"] = bias.at[text_ids.sep_id].set(-1e9)   # never ends early
  query = config.caption.decode_query == "mask"
  print(f"# {datetime.date.today()} {platform.machine()} {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}; {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M "
        f"params; {max_len} tokens; decode_query={config.caption.decode_query}", flush=True)
  rows = []
  for method in _METHODS.value:
    for b in (int(x) for x in _BATCH.value):
      images = np.random.default_rng(0).integers(0, 256, (b, size, size, 3), dtype=np.uint8)
      per_cache = {}
      for use_cache in (True, False):
        fn = jax.jit(caption_decoder(model, text_ids, max_len=max_len, method=method,
                                     beam_size=3, mask_query=query, use_cache=use_cache))
        start = time.perf_counter()
        compiled = fn.lower(params, images).compile()
        compile_s = time.perf_counter() - start
        tokens, _ = compiled(params, images)
        jax.block_until_ready(tokens)
        assert int((np.asarray(tokens) != 0).sum(axis=1).min()) == max_len
        times = []
        for _ in range(_REPEATS.value):
          start = time.perf_counter()
          jax.block_until_ready(compiled(params, images))
          times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        per_cache[use_cache] = seconds
        rows.append((method, b, "yes" if use_cache else "no", compile_s, seconds,
                     b * max_len / seconds))
        print(f"{method} batch {b} cache {use_cache}: compile {compile_s:.1f} s, "
              f"{seconds:.3f} s/call, {b * max_len / seconds:.0f} tokens/s", flush=True)
      rows[-2] += (per_cache[False] / per_cache[True],)
      rows[-1] += ("",)
  print("\n| method | batch | KV cache | compile s | s / call | tokens / s | cache speed-up |")
  print("|---|---:|---|---:|---:|---:|---:|")
  for method, b, cache, compile_s, seconds, tps, speedup in rows:
    up = f"{speedup:.1f}x" if speedup else ""
    print(f"| {method} | {b} | {cache} | {compile_s:.1f} | {seconds:.3f} | {tps:,.0f} | {up} |")


if __name__ == "__main__":
  main(sys.argv)
