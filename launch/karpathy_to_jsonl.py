"""Convert a Karpathy split (COCO / Flickr30k) to JSONL files for config.data.jsonl.

    python launch/karpathy_to_jsonl.py --karpathy_json=dataset_coco.json \
        --image_root=/data/coco --output_dir=/data/coco_jsonl
    python launch/main.py --config=configs/retrieval.py --config.data.name=jsonl \
        --config.data.jsonl.train=/data/coco_jsonl/train.jsonl \
        --config.data.jsonl.val=/data/coco_jsonl/val.jsonl \
        --config.data.jsonl.test=/data/coco_jsonl/test.jsonl ...

Reads dataset_coco.json / dataset_flickr30k.json ({"images": [{"filepath"
(COCO only), "filename", "split", "sentences": [{"raw"}, ...]}, ...]}) and
writes <output_dir>/{train,val,test}.jsonl, one line per image:
{"image": <absolute path image_root/filepath/filename>, "captions": [raw
sentences, stripped, empty ones dropped]}. train holds the "train" and
"restval" splits, as ALBEF and BLIP train on them. clusjax.data.sources.
JsonlSource reads each caption as a record with the image's "image_id", so
retrieval follows the COCO / Flickr protocol (5 captions per image).

Images whose file is missing are counted and warned about; --skip_missing
(default) leaves them out, --noskip_missing keeps them (the training pipeline
then counts them as bad records). Files are written atomically. Exits 2 naming
the file and key on a missing or malformed JSON file.
"""
import json
import os
import sys

from absl import flags

# Make `clusjax` importable from a plain checkout too (no `pip install -e .`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clusjax.cli import fail, parse_flags  # noqa: E402

_KARPATHY_JSON = flags.DEFINE_string("karpathy_json", None,
                                     "dataset_coco.json or dataset_flickr30k.json.")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None,
                                  "Folder that holds <filepath>/<filename> (COCO: val2014/, "
                                  "train2014/; Flickr30k: the images themselves).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where train/val/test.jsonl go.")
_SKIP_MISSING = flags.DEFINE_bool("skip_missing", True,
                                  "Leave out images whose file is missing (else keep them).")

# Output file -> the Karpathy splits it holds.
SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
_MAX_LISTED = 5   # missing files named in the warning
_PROGRESS_EVERY = 20000


def load_karpathy(path):
  """The "images" list of a Karpathy split JSON; exits 2 naming the problem."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    fail(f"--karpathy_json={path}: cannot read it ({e.strerror})")
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    fail(f"--karpathy_json={path}: malformed JSON ({e}); expected the Karpathy split "
         "(dataset_coco.json / dataset_flickr30k.json)")
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    fail(f'--karpathy_json={path}: no "images" list at the top level; expected '
         '{"images": [{"filename", "split", "sentences"}, ...]}')
  return data["images"]


def convert(images, path, image_root):
  """{output split: [(image path, [caption])]} and {output split: missing count}."""
  out = {name: [] for name in SPLITS}
  missing = {name: [] for name in SPLITS}
  to_output = {k: name for name, ks in SPLITS.items() for k in ks}
  for i, entry in enumerate(images):
    where = f"{path}: images[{i}]"
    if not isinstance(entry, dict):
      fail(f"{where} is a {type(entry).__name__}, not an object")
    for key in ("filename", "split", "sentences"):
      if key not in entry:
        fail(f'{where} has no "{key}" key (keys: {sorted(entry)})')
    if entry["split"] not in to_output:
      fail(f'{where}: "split"={entry["split"]!r} is not one of {sorted(to_output)}')
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not all(
        isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
      fail(f'{where}: "sentences" must be a list of {{"raw": <text>}} objects')
    captions = [s["raw"].strip() for s in sentences]
    captions = [c for c in captions if c]
    if not captions:  # JsonlSource rejects an empty list; say which image, not which line
      fail(f'{where} ({entry["filename"]}): no non-empty "sentences"[*]["raw"]')
    image = os.path.join(image_root, entry.get("filepath", ""), entry["filename"])
    name = to_output[entry["split"]]
    if not os.path.isfile(image):
      missing[name].append(image)
    out[name].append((image, captions))
    if (i + 1) % _PROGRESS_EVERY == 0:
      print(f"  checked {i + 1}/{len(images)} images", flush=True)
  return out, missing


def write_jsonl(path, rows):
  """Writes rows [(image, captions)] as JSONL lines via a tmp file + os.replace."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for image, captions in rows:
        f.write(json.dumps({"image": image, "captions": captions}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv):
  parse_flags(argv, {"karpathy_json": "dataset_coco.json", "image_root": "/data/coco",
                     "output_dir": "/data/coco_jsonl"})
  path = _KARPATHY_JSON.value
  image_root = os.path.abspath(os.path.expanduser(_IMAGE_ROOT.value))
  output_dir = os.path.expanduser(_OUTPUT_DIR.value)
  if not os.path.isdir(image_root):
    fail(f"--image_root={_IMAGE_ROOT.value}: no such folder")
  images = load_karpathy(path)
  print(f"Read {len(images)} images from {path}.", flush=True)
  splits, missing = convert(images, path, image_root)
  os.makedirs(output_dir, exist_ok=True)

  all_missing = [m for name in SPLITS for m in missing[name]]
  if all_missing:
    action = "left out" if _SKIP_MISSING.value else "kept (the pipeline counts them as bad)"
    listed = ", ".join(all_missing[:_MAX_LISTED])
    more = f" and {len(all_missing) - _MAX_LISTED} more" if len(all_missing) > _MAX_LISTED else ""
    print(f"warning: {len(all_missing)} image files are missing under {image_root}, {action}: "
          f"{listed}{more}", file=sys.stderr, flush=True)
  for name in SPLITS:
    rows = splits[name]
    if _SKIP_MISSING.value:
      gone = set(missing[name])
      rows = [r for r in rows if r[0] not in gone]
    out = os.path.join(output_dir, f"{name}.jsonl")
    write_jsonl(out, rows)
    print(f"{name:5s} ({'+'.join(SPLITS[name])}): {len(rows)} images, "
          f"{sum(len(c) for _, c in rows)} captions, {len(missing[name])} missing files "
          f"-> {out}", flush=True)


if __name__ == "__main__":
  main(sys.argv)
