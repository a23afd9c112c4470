"""launch/ablate.py: rows x seeds, a table from their eval results, resume."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT, micro_flags, subprocess_env

ABLATE = [sys.executable, os.path.join(ROOT, "launch", "ablate.py"),
          "--config=" + os.path.join(ROOT, "configs", "clus_base.py:tiny")]
# ITC only and 3 steps: the rows differ in the contrastive term alone.
SMALL = ["--config.loss.itm_weight=0", "--config.loss.mlm_weight=0",
         "--config.loss.swap_prediction=False", "--config.loss.prompt_weight=0",
         "--config.loss.noun_code_weight=0", "--config.loss.noun_code_text_weight=0",
         "--config.train.num_steps=3",
         "--config.eval.evaluators=('retrieval',)"]


def test_ablation_table_from_rows_and_seeds(shapes_data_dir, tmp_path):
  cmd = ABLATE + [f"--workdir={tmp_path}", "--rows=itc,siglip", "--seeds=2"] + SMALL + [
      f for f in micro_flags(shapes_data_dir) if "train.num_steps" not in f]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((tmp_path / "ablation.json").read_text())
  assert set(out["runs"]) == {"itc", "siglip"} and out["steps"] == 3
  for row in ("itc", "siglip"):
    runs = [json.loads((tmp_path / row / f"seed{s}" / "eval_results.json").read_text())
            for s in (0, 1)]
    assert out["runs"][row] == runs
    mean, std = out["summary"][row]["retrieval/i2t_r1"]
    assert abs(mean - (runs[0]["retrieval/i2t_r1"] + runs[1]["retrieval/i2t_r1"]) / 2) < 1e-9
  # The seeds are different runs; SigLIP is a different loss.
  losses = {(row, s): (tmp_path / row / f"seed{s}" / "metrics.jsonl").read_text()
            for row in ("itc", "siglip") for s in (0, 1)}
  assert losses["itc", 0] != losses["itc", 1] != losses["siglip", 1]
  table = (tmp_path / "ablation.md").read_text()
  assert "| itc |" in table and "| siglip |" in table and "top-1 prob" in table
  assert "neg. sim." in table and all("train/negative_similarity" in r for r in runs)
  assert (tmp_path / "ablation.png").stat().st_size > 0

  # Done runs are not redone: the same command only rebuilds the table.
  proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
  assert proc.returncode == 0 and "mesh {" not in proc.stdout   # no run started
  assert json.loads((tmp_path / "ablation.json").read_text()) == out


def test_ablate_rejects_an_unknown_row(tmp_path):
  proc = subprocess.run(ABLATE + [f"--workdir={tmp_path}", "--rows=itc,nope"],
                        capture_output=True, text=True, env=subprocess_env(), timeout=120)
  assert proc.returncode != 0 and "unknown row(s) nope" in proc.stderr
