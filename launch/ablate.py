"""Compare contrastive objectives on one config: rows x seeds, one table.

    python launch/ablate.py --config=configs/clus_base.py:tiny --workdir=workdirs/ablate \
        --rows=clip,softclip,softclip_tags,label_smooth,siglip --seeds=2 [--config.a.b=value ...]

Each row is the config with one change (ROWS below); each (row, seed) trains
for the config's steps in <workdir>/<row>/seed<k> and is evaluated as
`launch/main.py` does. A run that has its eval_results.json is not redone, so
re-running the same command resumes a killed ablation (a half-trained run
resumes from its checkpoint). Writes, in <workdir>:

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

# Row -> config overrides (keys with dots). The seed sets config.seed (init,
# dropout, masking) and config.data.seed (order of the batches).
ROWS = {
    "clip": {},                                       # InfoNCE (CLIP / ALBEF ITC)
    "softclip": {"loss.itc.kind": "softclip"},        # Gao et al. 2023, feature self-similarity
    "softclip_tags": {"loss.itc.kind": "softclip",    # ... of each caption's objects (tags)
                      "loss.itc.softclip.self_similarity": "tags"},
    "label_smooth": {"loss.itc.kind": "label_smooth"},  # SoftCLIP's baseline
    "siglip": {"loss.itc.kind": "siglip"},            # Zhai et al. 2023
}
# (eval_results.json key, column title)
COLUMNS = (("retrieval/i2t_r1", "i2t R@1"), ("retrieval/t2i_r1", "t2i R@1"),
           ("zeroshot/accuracy", "zero-shot"), ("retrieval/i2t_top1_prob", "top-1 prob"))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the table go.")
_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Rows to run, of: {', '.join(ROWS)}.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per row (0, 1, ...).")


def row_config(config, row, seed):
  """`config` with `row`'s overrides and `seed`."""
  c = config.copy_and_resolve_references()
  for key, value in ROWS[row].items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.seed = seed
  c.data.seed = seed
  return c


def run_one(config, workdir):
  """Trains (or resumes) and evaluates in `workdir`; returns the eval results."""
  results_file = os.path.join(workdir, "eval_results.json")
  if os.path.exists(results_file):
    with open(results_file) as f:
      return json.load(f)
  from clusjax.api import Pretrained
  from clusjax.eval import evaluate
  from clusjax.train.loop import train
  model, state, tokenizer = train(config, workdir)
  return evaluate(config, Pretrained(model, state.params, tokenizer, config, state.active),
                  workdir)


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
  from clusjax.config import ConfigError, validate
  configs = {}
  for row in _ROWS.value:
    for seed in range(_SEEDS.value):
      try:
        configs[row, seed] = row_config(_CONFIG.value, row, seed)
        validate(configs[row, seed])
      except ConfigError as e:
        fail(f"row {row!r}: {e}")

  from absl import logging
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
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
  table = table_markdown(summary, _SEEDS.value, steps)
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(table)
  bar_chart(summary, os.path.join(workdir, "ablation.png"))
  print(table, flush=True)


if __name__ == "__main__":
  main(sys.argv)
