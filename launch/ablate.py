"""Ablate Clus on one config: rows x seeds, one table.

    python launch/ablate.py --config=configs/clus_base.py:tiny --workdir=workdirs/ablate \
        [--rows=itc,clus,siglip] [--seeds=2] [--config.a.b=value ...]

Each row is the config with one change (ROWS below: the Clus objective built
up term by term, then other fusion, contrastive losses, uni-modal contrast
and clustered hard negatives); each (row, seed) trains for the config's steps
in <workdir>/<row>/seed<k> and is evaluated as `launch/main.py` does. A run
that has its eval_results.json is not redone, so re-running the same command
resumes a killed ablation (a half-trained run resumes from its checkpoint).
Writes, in <workdir>:

    ablation.md    mean +- standard deviation over seeds, one row per method
    ablation.json  every run's figures
    ablation.png   bar chart of the same
"""
import json
import os
import sys
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

# Make `clusjax` importable from a plain checkout too (no `pip install -e .`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clusjax.cli import fail, parse_flags  # noqa: E402
from clusjax.config import set_key  # noqa: E402
from clusjax.config_checks import LABEL_LOSS_KEYS  # noqa: E402

# Row -> config overrides (keys with dots; a value may be a function of the
# config), relative to the full Clus objective (configs/clus_base.py). The
# first six build it up term by term (paper Table 5), the rest change one
# thing of it. The seed sets config.seed (init, dropout, masking) and
# config.data.seed (order of the batches).
_NO_LABELS = {f"loss.{key}": 0.0 for key in LABEL_LOSS_KEYS}
# The paper's rows leave out the uni-modal views (which :tiny adds for place).
_NO_LABELS.update({"loss.unimodal.image_weight": 0.0, "loss.unimodal.text_weight": 0.0})


ROWS = {
    "itc": {"loss.itm_weight": 0.0, "loss.mlm_weight": 0.0, "loss.swap_prediction": False,
            **_NO_LABELS},                               # ITC only (CLIP / ALBEF InfoNCE)
    "itc_itm_mlm": {"loss.swap_prediction": False, **_NO_LABELS},   # + ITM + MLM (ALBEF)
    "swap": {"clustering.enabled": False, "longnet.depth": 0, **_NO_LABELS},  # + L_z, fixed k
    "open_clusters": {"longnet.depth": 0, **_NO_LABELS},  # + DBSCAN sets k
    "longnet": dict(_NO_LABELS),                         # + LongNet = Clus w/o distillation
    "clus": {},                                          # + prompt-template labels: Clus
    "self_attention": {"model.fusion": "self_attention"},   # fusion by self-attention
    "softclip": {"loss.itc.kind": "softclip"},           # Gao et al. 2023, feature self-similarity
    "softclip_tags": {"loss.itc.kind": "softclip",       # ... of each caption's objects (tags)
                      "loss.itc.softclip.self_similarity": "tags"},
    "label_smooth": {"loss.itc.kind": "label_smooth"},   # SoftCLIP's baseline
    "unimodal": {"loss.unimodal.image_weight": 1.0,      # + image-image and text-text InfoNCE
                 "loss.unimodal.text_weight": 1.0},
    "clustered": {"train.stages": ({"fraction": 0.5},   # 2nd half: clustered hard negatives
                                   {"fraction": 0.5, "sampler": "clustered", "mix": 0.5})},
    "siglip": {"loss.itc.kind": "siglip"},               # Zhai et al. 2023
}
DEFAULT_ROWS = [r for r in ROWS if r != "softclip_tags"]
# (eval_results.json key, column title); train/negative_similarity is the mean
# logged in-batch negative similarity over the second half of training.
COLUMNS = (("retrieval/i2t_r1", "i2t R@1"), ("retrieval/t2i_r1", "t2i R@1"),
           ("zeroshot/accuracy", "zero-shot"), ("retrieval/i2t_top1_prob", "top-1 prob"),
           ("train/negative_similarity", "neg. sim."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the table go.")
_ROWS = flags.DEFINE_list("rows", DEFAULT_ROWS, f"Rows to run, of: {', '.join(ROWS)}.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per row (0, 1, ...).")
_FIRST_SEED = flags.DEFINE_integer(
    "first_seed", 0, "Run seeds first_seed, ... only (split an ablation over processes or "
    "machines sharing the workdir; a last run with --first_seed=0 writes the whole table).")


def row_config(config, row, seed):
  """`config` with `row`'s overrides and `seed`."""
  c = config.copy_and_resolve_references()
  for key, value in ROWS[row].items():
    set_key(c, key, value)
  c.seed = seed
  c.data.seed = seed
  return c


def run_one(config, workdir):
  """Trains (or resumes) and evaluates in `workdir`; returns the eval results."""
  results_file = os.path.join(workdir, "eval_results.json")
  if os.path.exists(results_file):
    with open(results_file) as f:
      return json.load(f)
  from clusjax import workdir as wd
  from clusjax.api import Pretrained
  from clusjax.eval import evaluate
  from clusjax.train.loop import train
  model, state, tokenizer = train(config, workdir)
  results = evaluate(config, Pretrained(model, state.params, tokenizer, config, state.active),
                     workdir)
  with open(wd.path(workdir, wd.METRICS_FILE)) as f:
    logged = [json.loads(line) for line in f]
  late = [m["negative_similarity"] for m in logged
          if "negative_similarity" in m and m["step"] > config.train.num_steps // 2]
  if late:
    results["train/negative_similarity"] = float(np.mean(late))
  with open(results_file, "w") as f:
    json.dump(results, f, indent=2)
  return results


def summarize(results):
  """{row: [results of each seed]} -> {row: {key: (mean, std)}}."""
  return {row: {key: (float(np.mean([r[key] for r in runs])),
                      float(np.std([r[key] for r in runs])))
                for key, _ in COLUMNS if all(key in r for r in runs)}
          for row, runs in results.items()}


def table_markdown(summary, num_seeds, steps):
  lines = [f"Mean +- standard deviation over {num_seeds} seeds, {steps} steps each.", "",
           "| row | " + " | ".join(title for _, title in COLUMNS) + " |",
           "| --- |" + " --- |" * len(COLUMNS)]
  for row, figures in summary.items():
    cells = [f"{figures[k][0]:.3f} +- {figures[k][1]:.3f}" if k in figures else "-"
             for k, _ in COLUMNS]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def bar_chart(summary, file):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = list(summary)
  fig, ax = plt.subplots(figsize=(2 + 1.6 * len(rows), 3.5))
  width = 0.8 / len(COLUMNS)
  for i, (key, title) in enumerate(COLUMNS):
    means = [summary[r].get(key, (np.nan, 0))[0] for r in rows]
    stds = [summary[r].get(key, (np.nan, 0))[1] for r in rows]
    ax.bar(np.arange(len(rows)) + (i - (len(COLUMNS) - 1) / 2) * width, means, width,
           yerr=stds, label=title, capsize=2)
  ax.set_xticks(np.arange(len(rows)), rows)
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8, ncol=len(COLUMNS), loc="upper center", bbox_to_anchor=(0.5, 1.15))
  fig.tight_layout()
  fig.savefig(file, dpi=120)
  plt.close(fig)


def main(argv):
  parse_flags(argv, {"config": "configs/clus_base.py:tiny", "workdir": "workdirs/ablate"})
  unknown = [r for r in _ROWS.value if r not in ROWS]
  if unknown:
    fail(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}.")
  if _SEEDS.value < 1:
    fail(f"--seeds={_SEEDS.value} must be >= 1.")
  if not 0 <= _FIRST_SEED.value < _SEEDS.value:
    fail(f"--first_seed={_FIRST_SEED.value} must be in [0, --seeds={_SEEDS.value}).")
  from clusjax.config import ConfigError, validate
  configs = {}
  for row in _ROWS.value:
    for seed in range(_FIRST_SEED.value, _SEEDS.value):
      try:
        configs[row, seed] = row_config(_CONFIG.value, row, seed)
        validate(configs[row, seed])
      except ConfigError as e:
        fail(f"row {row!r}: {e}")

  from absl import logging
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  # A row's seeds compile the same programs: compile them once.
  import jax
  from clusjax.parallel import cpu
  cpu.run_inline()           # before JAX's backends start (clusjax/parallel/cpu.py)
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir),
                                                              ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  results = {row: [] for row in _ROWS.value}
  for (row, seed), config in configs.items():
    run_dir = os.path.join(workdir, row, f"seed{seed}")
    print(f"== {row} seed {seed} -> {run_dir}", flush=True)
    start = time.perf_counter()
    results[row].append(run_one(config, run_dir))
    print(f"== {row} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)

  summary = summarize(results)
  steps = _CONFIG.value.train.num_steps
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump({"runs": results, "summary": summary, "steps": steps}, f, indent=2)
  table = table_markdown(summary, _SEEDS.value - _FIRST_SEED.value, steps)
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(table)
  bar_chart(summary, os.path.join(workdir, "ablation.png"))
  print(table, flush=True)


if __name__ == "__main__":
  main(sys.argv)
