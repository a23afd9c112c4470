"""Prepare an image-text set as TFDS ArrayRecord: WebDataset shards (or img2dataset's
folder / parquet output) or a Karpathy JSON.

    python launch/prepare_data.py webdataset --input='/data/cc3m/{00000..00331}.tar' \
        --output=/data/tfds --name=cc3m [--image_size=256] [--test_fraction=0.001]
    python launch/prepare_data.py karpathy --input=/data/coco/dataset_coco.json \
        --image_root=/data/coco --output=/data/tfds --name=coco_karpathy
    # on Apache Beam, here with 8 local worker processes:
    python launch/prepare_data.py webdataset ... --beam --num_workers=8
    # or on a cluster: any Beam pipeline option after the flags, e.g.
    python launch/prepare_data.py webdataset ... --beam --runner=DataflowRunner \
        --project=P --region=R --temp_location=gs://B/tmp --output=gs://B/tfds
    # then train on it:
    python launch/main.py --config=configs/clus_base.py --config.data.name=tfds \
        --config.data.tfds_name=cc3m --config.data.data_dir=/data/tfds

Images are decoded once, shrunk to --image_size on the shorter side and
re-encoded; exact duplicates are dropped and damaged records skipped, both
counted in the closing summary and in the set's metadata.json. A build
killed halfway is never read as complete (TFDS renames its incomplete.*
folder at the end); run the same command again to build it. Bad input exits
2 with one line naming it.
"""
import os
import sys

from absl import flags

# Make `clusjax` importable from a plain checkout too (no `pip install -e .`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clusjax.cli import fail  # noqa: E402

KINDS = ("webdataset", "karpathy")
_INPUT = flags.DEFINE_string("input", None, "webdataset: a glob or brace list of shards: tar "
                             "files, img2dataset's parquet files or its output folders (several "
                             "separated by commas); karpathy: the split JSON.")
_OUTPUT = flags.DEFINE_string("output", None, "The TFDS data dir the set goes to.")
_NAME = flags.DEFINE_string("name", None, "The set's TFDS name (config.data.tfds_name).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Shorter image side after the build "
                                   "(images are never enlarged); 0 keeps the size.")
_MAX_IMAGE_BYTES = flags.DEFINE_integer("max_image_bytes", 50 << 20,
                                        "Encoded images larger than this are skipped (huge_image).")
_IMAGE_KEYS = flags.DEFINE_list("image_keys", ["jpg", "jpeg", "png", "webp"],
                                "webdataset: image member extensions, first present wins.")
_CAPTION_KEY = flags.DEFINE_string("caption_key", "txt", "webdataset: caption member extension "
                                   "(parquet: that column, else 'caption').")
_JSON_KEY = flags.DEFINE_string("json_key", "json", "webdataset: JSON member extension.")
_KEEP_JSON = flags.DEFINE_list("keep_json", [], "webdataset: fields of the JSON member kept "
                               "as text features, e.g. url,width,height.")
_TEST_FRACTION = flags.DEFINE_float("test_fraction", 0.0, "webdataset: the fraction of records "
                                    "held out as split 'test' (chosen by content hash).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", "", "karpathy: the folder holding "
                                  "<filepath>/<filename>; default the JSON's folder.")
_BEAM = flags.DEFINE_bool("beam", False, "Build with Apache Beam; other flags after these are "
                          "Beam pipeline options (--runner, --project, --flink_master, ...).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "--beam with the DirectRunner: worker "
                                    "processes (default: the CPU count).")


def beam_options(extra, num_workers):
  """Beam PipelineOptions from the leftover flags; unknown ones fail in one line."""
  import argparse  # pylint: disable=g-import-not-at-top
  from apache_beam.options import pipeline_options as po  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
  stack = [po.PipelineOptions]
  while stack:   # every options class Beam defines (Dataflow, Flink, Spark, direct, ...)
    cls = stack.pop()
    stack.extend(cls.__subclasses__())
    try:
      cls._add_argparse_args(parser)  # pylint: disable=protected-access
    except argparse.ArgumentError:
      pass   # a flag two classes share
  known, unknown = parser.parse_known_args(extra)
  if unknown:
    fail(f"unknown flag {unknown[0]}: neither a prepare_data.py flag nor a Beam pipeline option")
  runner = getattr(known, "runner", None) or "DirectRunner"
  if runner in ("DirectRunner", "direct"):
    workers = num_workers or os.cpu_count() or 1
    extra = [f"--runner={runner}", f"--direct_num_workers={workers}",
             f"--direct_running_mode={'multi_processing' if workers > 1 else 'in_memory'}",
             *[a for a in extra if not a.startswith("--runner")]]
  elif num_workers:
    fail(f"--num_workers={num_workers} is for the DirectRunner; {runner} takes its own "
         "flags (Dataflow: --max_num_workers, Flink: --parallelism)")
  return po.PipelineOptions(extra)


def print_summary(out, name, data_dir):
  splits = ", ".join(f"{s} {n:,}" for s, n in sorted(out["splits"].items()))
  skipped = sum(out["skipped"].values())
  print(f"\n{name}: {out['path']}")
  print(f"  written:    {splits}")
  print(f"  skipped:    {skipped:,}" + (" (" + ", ".join(
      f"{n:,} {reason}" for reason, n in sorted(out["skipped"].items())) + ")" if skipped else ""))
  print(f"  duplicates: {out['duplicates']:,} dropped")
  print(f"  train on it: python launch/main.py --config=configs/clus_base.py "
        f"--config.data.name=tfds --config.data.tfds_name={name} --config.data.data_dir={data_dir}"
        + ("" if "test" in out["splits"] else
           f" --config.data.eval_split={sorted(out['splits'])[-1]}"), flush=True)


def main(argv):
  try:
    rest = flags.FLAGS(argv, known_only=True)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  kind, extra = (rest[1] if len(rest) > 1 else None), rest[2:]
  if kind not in KINDS:
    fail(f"give what to prepare first: {' or '.join(KINDS)} (got {kind!r}), e.g. "
         "python launch/prepare_data.py webdataset --input='shards/*.tar' --output=DIR --name=NAME")
  for flag, example in ((_INPUT, "'shards/{00000..00009}.tar'"), (_OUTPUT, "/data/tfds"),
                        (_NAME, "my_pairs")):
    if not flag.value:
      fail(f"--{flag.name} is required, e.g. --{flag.name}={example}")
  if extra and not _BEAM.value:
    fail(f"unknown flag {extra[0]} (Beam pipeline options need --beam)")
  options = beam_options(extra, _NUM_WORKERS.value) if _BEAM.value else None

  from clusjax.data import builders  # pylint: disable=g-import-not-at-top (TFDS: slow import)
  kwargs = dict(image_size=_IMAGE_SIZE.value, max_image_bytes=_MAX_IMAGE_BYTES.value)
  if kind == "webdataset":
    kwargs.update(image_keys=_IMAGE_KEYS.value, caption_key=_CAPTION_KEY.value,
                  json_key=_JSON_KEY.value, keep_json=_KEEP_JSON.value,
                  test_fraction=_TEST_FRACTION.value)
  else:
    kwargs.update(image_root=_IMAGE_ROOT.value)
  try:
    out = builders.prepare(kind, input=_INPUT.value, data_dir=_OUTPUT.value, name=_NAME.value,
                           beam=_BEAM.value, beam_options=options, **kwargs)
  except builders.InputError as e:
    fail(str(e))
  print_summary(out, _NAME.value, _OUTPUT.value)


if __name__ == "__main__":
  main(sys.argv)
