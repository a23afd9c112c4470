"""Input throughput: the Grain pipeline over a prepared ArrayRecord set vs a plain
`webdataset` loader over tar shards of the same images, and the JPEG decoders.

    nice -n 10 python benchmarks/input_pipeline.py [--num_images=1024] [--workers=2]
        [--image_size=224] [--stored_size=256] [--batch_size=64] [--rounds=5]

Makes --num_images distinct photos (random crops of scikit-learn's two sample
photos, 640 x 427, so JPEGs compress and decode like real ones), prepares them
with clusjax.data.builders (shorter side --stored_size, JPEG q95), and writes
the stored JPEGs and captions to WebDataset tar shards. Then, in the same run:

* grain: clusjax.data.pipeline.make_train_iterator over the TFDS source:
  ArrayRecord read + decode (damage-checked) + resize to --image_size +
  tokenize + batch; one decoding thread, no worker ("per core"), and with
  --workers Grain worker processes;
* webdataset: webdataset.WebDataset(shards).decode("pil") + the same resize,
  tokenizer and batching, in this process ("per core") and in a torch
  DataLoader with --workers processes;
* decoders: each JPEG decoder that is installed, on the stored JPEGs.

"images/s per core" = images / CPU seconds of this process (its threads),
measured with time.process_time, so other jobs on a shared machine do not
lower it much; the worker runs give wall-clock images/s. The per-core runs
alternate (grain, webdataset, grain, ...) for --rounds rounds, so drifts in
the machine's speed hit both loaders alike: the table gives each loader's
median and range, and the median of the per-round ratios grain / webdataset.
Prints a Markdown report for benchmarks/RESULTS.md, with the host cores an
8-GPU host needs at 5,000 images/s per GPU.
"""
import io
import math
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import PIL.Image
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from clusjax.cli import parse_flags  # noqa: E402

_NUM_IMAGES = flags.DEFINE_integer("num_images", 1024, "Distinct images to prepare.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes of the parallel runs.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Training image size (square).")
_STORED_SIZE = flags.DEFINE_integer("stored_size", 256, "Shorter side stored at build time.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of both loaders.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Batches timed per run (after 2 warm-up).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating per-core rounds of the two loaders.")
TARGET_PER_GPU, GPUS = 5_000, 8
MAX_TEXT_LEN = 32


def make_photos(n):
  """n distinct JPEGs, ~640 x 480 crops of sklearn's sample photos, with captions."""
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
    crop = PIL.Image.fromarray(photo[y:, x:]).resize((640, 480), PIL.Image.BILINEAR)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=90)
    out.append((buf.getvalue(), f"photo {i} of a {'palace' if i % 2 else 'flower'} "
                                f"seen from point {y} {x}"))
  return out


def write_tars(folder, samples, per_shard=256):
  paths = []
  for s in range(0, len(samples), per_shard):
    path = os.path.join(folder, f"{s // per_shard:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for j, (image, caption) in enumerate(samples[s:s + per_shard]):
        for ext, data in (("jpg", image), ("txt", caption.encode())):
          info = tarfile.TarInfo(f"{s + j:08d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths


def timed(batches, num, batch_size):
  """(images/s wall, images per CPU second of this process) over `num` batches after 2."""
  it = iter(batches)
  for _ in range(2):
    next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(num):
    next(it)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return num * batch_size / wall, num * batch_size / max(cpu, 1e-9)


class WdsMap:
  """A webdataset sample (PIL image, caption) -> the pipeline's example (resize + tokenize)."""

  def __init__(self, tokenizer, size):
    self.tokenizer, self.size = tokenizer, size

  def __call__(self, sample):
    image, caption = sample
    image = image.convert("RGB").resize((self.size, self.size), PIL.Image.BICUBIC)
    ids, mask = self.tokenizer.encode_one(caption, MAX_TEXT_LEN)
    return np.asarray(image, np.uint8), ids, mask


def wds_loader(shards, tokenizer, workers):
  import webdataset as wds
  ds = (wds.WebDataset(shards, shardshuffle=False, empty_check=False).repeat()
        .decode("pil").to_tuple("jpg", "txt").map(WdsMap(tokenizer, _IMAGE_SIZE.value))
        .batched(_BATCH.value))
  if not workers:
    return ds
  import torch
  # One shard list per worker (wds splits by worker); batches come as numpy.
  return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                     collate_fn=lambda b: b)


def decoders():
  """{name: bytes -> uint8 [H, W, 3]} for the installed decoders."""
  out = {"Pillow": lambda b: np.asarray(PIL.Image.open(io.BytesIO(b)).convert("RGB"))}
  try:
    import simplejpeg
    out["simplejpeg"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")
  except ImportError:
    pass
  try:
    import turbojpeg
    import ctypes.util
    tj = turbojpeg.TurboJPEG(ctypes.util.find_library("turbojpeg"))
    out["PyTurboJPEG"] = lambda b: tj.decode(b, pixel_format=turbojpeg.TJPF_RGB)
  except (ImportError, RuntimeError, OSError) as e:   # PyTurboJPEG 2.x needs libjpeg-turbo 3
    print(f"PyTurboJPEG not measured: {str(e).strip().splitlines()[0]}")
  try:
    import cv2
    cv2.setNumThreads(1)
    out["opencv"] = lambda b: cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8),
                                                        cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  except ImportError:
    pass
  return out


def main(argv):
  parse_flags(argv, {})
  import platform

  from clusjax.data import builders, pipeline
  from clusjax.data.sources import TfdsSource, _open_tfds
  from clusjax.data.tokenizer import Tokenizer
  tmp = tempfile.mkdtemp(prefix="input_bench_")
  photos = make_photos(_NUM_IMAGES.value)
  raw = os.path.join(tmp, "raw")
  os.makedirs(raw)
  write_tars(raw, photos)
  start = time.perf_counter()
  out = builders.prepare("webdataset", input=os.path.join(raw, "*.tar"), data_dir=tmp,
                         name="bench", image_size=_STORED_SIZE.value, log=lambda _: None)
  build_s = time.perf_counter() - start
  records, _ = _open_tfds("bench", "train", tmp)
  source = TfdsSource(records)
  stored = [(records[i]["image"], records[i]["caption"].decode()) for i in range(len(records))]
  resized = os.path.join(tmp, "resized")
  os.makedirs(resized)
  shards = write_tars(resized, stored)
  tokenizer = Tokenizer.train([c for _, c in stored], os.path.join(tmp, "tok.model"), 512)

  def grain(workers):
    return pipeline.make_train_iterator(
        source, global_batch_size=_BATCH.value, seed=0, image_size=_IMAGE_SIZE.value,
        tokenizer=tokenizer, max_text_len=MAX_TEXT_LEN, num_workers=workers)

  def grain_one_thread():
    threads = pipeline.READ_THREADS
    pipeline.READ_THREADS = 1     # one decoding thread: the per-core figure
    try:
      return grain(0)
    finally:
      pipeline.READ_THREADS = threads

  loaders = {"grain (ArrayRecord)": grain_one_thread,
             "webdataset (tar, PIL)": lambda: wds_loader(shards, tokenizer, 0)}
  per_core = {name: [] for name in loaders}
  wall = {name: [] for name in loaders}
  for _ in range(_ROUNDS.value):   # alternate: the machine's drifts hit both alike
    for name, make in loaders.items():
      rate_wall, rate_cpu = timed(make(), _BATCHES.value, _BATCH.value)
      wall[name].append(rate_wall)
      per_core[name].append(rate_cpu)
  workers = {"grain (ArrayRecord)": timed(grain(_WORKERS.value), _BATCHES.value, _BATCH.value)[0],
             "webdataset (tar, PIL)": timed(wds_loader(shards, tokenizer, _WORKERS.value),
                                            _BATCHES.value, _BATCH.value)[0]}
  jpegs = [b for b, _ in stored[:256]]
  decode = {}
  for name, fn in decoders().items():
    fn(jpegs[0])
    t = time.process_time()
    for b in jpegs:
      fn(b)
    decode[name] = len(jpegs) / (time.process_time() - t)

  w, h = PIL.Image.open(io.BytesIO(jpegs[0])).size
  print(f"## Input pipeline ({time.strftime('%Y-%m-%d')}, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores)\n")
  print(f"{len(stored)} photos prepared in {build_s:.1f} s (one process; {w} x {h} JPEG q95 "
        f"stored, {np.mean([len(b) for b, _ in stored]) / 1024:.0f} kB mean); batches of "
        f"{_BATCH.value} at {_IMAGE_SIZE.value} px, {_BATCHES.value} timed after 2.\n")
  print(f"| loader | images/s per core (CPU s), median [range] | images/s, 1 thread (wall) | "
        f"images/s, {_WORKERS.value} workers (wall) | cores for {GPUS} x {TARGET_PER_GPU:,}/s |")
  print("|---|---:|---:|---:|---:|")
  for name in loaders:
    rate = np.median(per_core[name])
    print(f"| {name} | {rate:,.0f} [{min(per_core[name]):,.0f}-{max(per_core[name]):,.0f}] | "
          f"{np.median(wall[name]):,.0f} | {workers[name]:,.0f} | "
          f"{math.ceil(GPUS * TARGET_PER_GPU / rate)} |")
  grain_rates, wds_rates = per_core.values()
  ratios = [g / w for g, w in zip(grain_rates, wds_rates)]
  print(f"\nPer core, grain / webdataset by round ({_ROUNDS.value} rounds): "
        + ", ".join(f"{r:.2f}" for r in ratios) + f"; median {np.median(ratios):.2f}.")
  print("\n| JPEG decoder | images/s per core | vs Pillow |")
  print("|---|---:|---:|")
  for name, rate in sorted(decode.items(), key=lambda kv: -kv[1]):
    print(f"| {name} | {rate:,.0f} | {rate / decode['Pillow']:.2f}x |")
  print(flush=True)


if __name__ == "__main__":
  main(sys.argv)
