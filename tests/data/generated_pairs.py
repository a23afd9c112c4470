"""Generated WebDataset shards (tar, and img2dataset's folder and parquet outputs) and
Karpathy JSON, with damaged members, for the builder tests.

Pair i: a distinct small image (noise + a colour per i, PNG or JPEG) and a caption
naming i. Damage is placed at fixed indices, each kind with the reason the build
must count it under (`expected_skips`).
"""
import io
import json
import os
import tarfile

import numpy as np
import PIL.Image

# Damage kinds, in the order they are placed, -> the reason a build counts.
DAMAGE = {"truncated": "truncated_image", "empty": "empty_image",
          "garbage": "undecodable_image", "no_caption": "empty_caption",
          "blank_caption": "empty_caption", "binary_caption": "binary_caption",
          "no_image": "missing_image", "huge": "huge_image"}
HUGE_BYTES = 300_000   # build these tests with max_image_bytes=HUGE_LIMIT
HUGE_LIMIT = 200_000


def image_bytes(i, size=(48, 40)):
  """A distinct image for pair i: noise from seed i, PNG for odd i, JPEG for even."""
  rng = np.random.default_rng(i)
  array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  array[: size[1] // 2] = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
  out = io.BytesIO()
  PIL.Image.fromarray(array).save(out, format="PNG" if i % 2 else "JPEG", quality=90)
  return out.getvalue(), "png" if i % 2 else "jpg"


def caption(i):
  return f"picture number {i} with colour {i * 37 % 256}"


def damaged(kind, i):
  """(members {ext: bytes}) of damaged pair i."""
  data, ext = image_bytes(i)
  text = caption(i).encode()
  if kind == "truncated":
    return {ext: data[: len(data) // 2], "txt": text}
  if kind == "empty":
    return {ext: b"", "txt": text}
  if kind == "garbage":
    return {ext: b"this is not an image" * 10, "txt": text}
  if kind == "no_caption":
    return {ext: data}
  if kind == "blank_caption":
    return {ext: data, "txt": b"   "}
  if kind == "binary_caption":
    return {ext: data, "txt": b"\xff\xfe\x00bad"}
  if kind == "no_image":
    return {"txt": text}
  return {"jpg": bytes(HUGE_BYTES), "txt": text}   # huge


def make_samples(num_pairs, corrupt_fraction=0.03, num_duplicates=5):
  """[(key, members, damage kind or None)]: damaged pairs spread evenly, kinds in turn,
  and `num_duplicates` exact copies of good pairs appended (distinct keys)."""
  num_bad = round(num_pairs * corrupt_fraction)
  bad_at = {int(j): list(DAMAGE)[n % len(DAMAGE)]
            for n, j in enumerate(np.linspace(3, num_pairs - 4, num_bad))} if num_bad else {}
  samples = []
  for i in range(num_pairs):
    kind = bad_at.get(i)
    if kind:
      samples.append((f"{i:06d}", damaged(kind, i), kind))
    else:
      data, ext = image_bytes(i)
      samples.append((f"{i:06d}", {ext: data, "txt": caption(i).encode(),
                                   "json": json.dumps({"url": f"http://x/{i}", "width": 48}).encode()},
                      None))
  good = [s for s in samples if s[2] is None]
  for n in range(num_duplicates):
    _, members, _ = good[(n * 7919) % len(good)]
    samples.append((f"dup{n:04d}", dict(members), None))
  return samples


def write_shards(folder, samples, num_shards):
  """Writes samples round-robin-free (contiguous) into num_shards tars; returns paths."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for s, chunk in enumerate(_chunks(samples, num_shards)):
    path = os.path.join(folder, f"{s:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for key, members, _ in chunk:
        for ext, data in members.items():
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths


def _chunks(samples, num_shards):
  return [[samples[j] for j in chunk]
          for chunk in np.array_split(np.arange(len(samples)), num_shards)]


def write_folders(folder, samples, num_shards):
  """The samples as img2dataset's "files" output: one folder per shard of member files."""
  paths = []
  for s, chunk in enumerate(_chunks(samples, num_shards)):
    path = os.path.join(folder, f"{s:05d}")
    os.makedirs(path)
    for key, members, _ in chunk:
      for ext, data in members.items():
        with open(os.path.join(path, f"{key}.{ext}"), "wb") as f:
          f.write(data)
    paths.append(path)
  return paths


def write_parquet(folder, samples, num_shards):
  """The samples as img2dataset's "parquet" output: columns key, caption (string), jpg
  and png (binary, null where the sample has none) and the JSON member's fields."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  paths = []
  for s, chunk in enumerate(_chunks(samples, num_shards)):
    rows = []
    for key, members, _ in chunk:
      text = members.get("txt")
      meta = json.loads(members["json"]) if "json" in members else {}
      rows.append({"key": key, "jpg": members.get("jpg"), "png": members.get("png"),
                   "caption": None if text is None else text.decode("utf-8", "replace"),
                   "url": meta.get("url"), "width": meta.get("width")})
    schema = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("png", pa.binary()),
                        ("caption", pa.string()), ("url", pa.string()), ("width", pa.int64())])
    path = os.path.join(folder, f"{s:05d}.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    paths.append(path)
  return paths


def expected_skips(samples):
  """{reason: count} the build must report."""
  out = {}
  for _, _, kind in samples:
    if kind:
      out[DAMAGE[kind]] = out.get(DAMAGE[kind], 0) + 1
  return out


def write_karpathy(folder, num_images, captions_per_image=5, missing=(), bad_caption=()):
  """dataset_flickr30k-like JSON + image files in folder/images; returns the JSON path.

  Splits: every 10th image val, every 10th + 1 test, every 10th + 2 restval, rest
  train. `missing`: indices without an image file; `bad_caption`: indices whose
  first caption is blank (left out, the image kept).
  """
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  images = []
  for i in range(num_images):
    data, ext = image_bytes(1000 + i)
    name = f"{i:05d}.{ext}"
    if i not in missing:
      with open(os.path.join(folder, "images", name), "wb") as f:
        f.write(data)
    split = {0: "val", 1: "test", 2: "restval"}.get(i % 10, "train")
    sentences = [{"raw": f"image {i} caption {j}"} for j in range(captions_per_image)]
    if i in bad_caption:
      sentences[0]["raw"] = "  "
    images.append({"filepath": "images", "filename": name, "split": split,
                   "sentences": sentences, "imgid": i})
  path = os.path.join(folder, "dataset_test.json")
  with open(path, "w") as f:
    json.dump({"images": images, "dataset": "test"}, f)
  return path
