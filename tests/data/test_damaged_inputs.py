"""Damaged inputs (issue 23, item 5): JSONL lines, image files and captions that
are skipped and counted by reason, images converted to RGB, all-bad sets refused.

Every damaged file is made here, in tmp_path.
"""
import io
import json
import struct
import time
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest

from clusjax import data
from clusjax.data import decoding, pipeline, shapes
from clusjax.data.damage import DataError, decode_image_bytes
from clusjax.data.nlvr import Nlvr2JsonlSource
from clusjax.data.sources import JsonlSource
from clusjax.data.vqa import VqaJsonlSource

S, L = 8, 16
# The bombs below make Pillow warn (between 1x and 2x its pixel limit); expected.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  captions = shapes.make_split("train", 200, 16)["captions"] + ["item 0123456789 bytes"]
  return data.Tokenizer.train(captions, tmp_path_factory.mktemp("tok") / "t.model", 200)


def _encoded(image, fmt="PNG", **kw):
  out = io.BytesIO()
  image.save(out, fmt, **kw)
  return out.getvalue()


def _png_header(width, height):
  """A PNG whose header claims width x height RGB pixels (and holds none): a bomb."""
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
          + chunk(b"IEND", b""))


def _noise(size=16, seed=0):
  return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), np.uint8))


# Good images in every mode, with the RGB value each must decode to (at [4, 4]).
GOOD = {
    "rgb.png": (PIL.Image.new("RGB", (S, S), (10, 200, 30)), (10, 200, 30)),
    "gray.png": (PIL.Image.new("L", (S, S), 90), (90, 90, 90)),
    "gray_alpha.png": (PIL.Image.new("LA", (S, S), (120, 7)), (120, 120, 120)),
    "rgba.png": (PIL.Image.new("RGBA", (S, S), (5, 6, 250, 0)), (5, 6, 250)),
    "palette.png": (PIL.Image.new("RGB", (S, S), (250, 0, 0)).convert(
        "P", palette=PIL.Image.Palette.ADAPTIVE), (250, 0, 0)),
    "cmyk.jpg": (PIL.Image.new("CMYK", (S, S), (0, 255, 0, 0)), (255, 0, 255)),
    # 16-bit grayscale: scaled to 8 bits (51400 // 257 = 200), not clipped to white.
    "gray16.png": (PIL.Image.fromarray(np.full((S, S), 51400, np.uint16)), (200, 200, 200)),
}


def _damaged_files(folder):
  """{file name: bytes} of damaged images, and the reason each must be skipped for."""
  jpeg, png = _encoded(_noise(), "JPEG"), _encoded(_noise())
  return {
      "empty.png": (b"", "empty_image"),
      "truncated.jpg": (jpeg[:len(jpeg) // 2], "truncated_image"),
      "truncated_header.jpg": (jpeg[:40], "truncated_image"),
      "truncated.png": (png[:len(png) // 2], "truncated_image"),
      "text.png": (b"not an image at all", "undecodable_image"),
      # 30000^2 pixels: over 2x Pillow's MAX_IMAGE_PIXELS (DecompressionBombError) ...
      "bomb.png": (_png_header(30_000, 30_000), "decompression_bomb"),
      # ... and 10000^2, between 1x and 2x, where Pillow only warns.
      "bomb_warn.png": (_png_header(10_000, 10_000), "decompression_bomb"),
  }


def _write_jsonl(path, lines):
  """lines: dicts (JSON-encoded) or bytes / str written as they are."""
  out = b""
  for line in lines:
    if isinstance(line, dict):
      line = json.dumps(line)
    out += (line if isinstance(line, bytes) else line.encode()) + b"\n"
  path.write_bytes(out)
  return path


def _decode_all(source, tok):
  batches = list(data.iterate_eval(source, batch_size=64, image_size=S, tokenizer=tok,
                                   max_text_len=L))
  return [dict(zip(b, values)) for b in batches
          for values in zip(*(b[k][:int(b["valid"].sum())] for k in b))]


def test_damaged_images_and_captions_skipped_counted_and_modes_converted(tmp_path, tok):
  folder = tmp_path / "set"
  folder.mkdir()
  lines = []
  for name, (image, _) in GOOD.items():
    (folder / name).write_bytes(_encoded(image, "JPEG" if name.endswith(".jpg") else "PNG"))
    lines.append({"image": name, "caption": f"good {name}"})
  expected = {"missing_image": 1}
  lines.append({"image": "no_such_file.png", "caption": "missing"})
  for name, (raw, reason) in _damaged_files(folder).items():
    (folder / name).write_bytes(raw)
    lines.append({"image": name, "caption": f"damaged {name}"})
    expected[reason] = expected.get(reason, 0) + 1
  # Captions: empty, whitespace, control characters, a "\ud800" escape, raw bytes
  # that are not UTF-8; and a 100 kB one, which is kept.
  long_caption = "a red circle above a blue square " * 3100
  lines += [{"image": "rgb.png", "caption": c} for c in ("", " \t\n ", "a\x00\x01b", "x\ud800y")]
  lines.append(b'{"image": "rgb.png", "caption": "bad \xff\xfe bytes"}')
  expected.update(empty_caption=2, binary_caption=3)
  lines.append({"image": "rgb.png", "caption": long_caption})
  source = JsonlSource(_write_jsonl(folder / "data.jsonl", lines))
  assert len(source) == len(lines) and source.skipped == {}

  data.reset_skipped_records()
  start = time.perf_counter()
  examples = _decode_all(source, tok)
  assert time.perf_counter() - start < 10
  assert pipeline.skipped_by_reason() == expected
  assert [e["caption"] for e in examples] == [f"good {n}" for n in GOOD] + [long_caption]
  for e, (name, (_, rgb)) in zip(examples, GOOD.items()):
    np.testing.assert_allclose(e["image"][4, 4], rgb, atol=3 if name.endswith(".jpg") else 0,
                               err_msg=name)
  # The 100 kB caption: tokenized from its start only, to the tokens of the whole.
  ids, mask = tok.encode_one(long_caption, L)
  np.testing.assert_array_equal(examples[-1]["text_ids"], ids)
  assert mask.all()

  metrics = pipeline.skip_metrics(source)
  assert metrics == {f"data/skipped/{r}": n for r, n in expected.items()}


def test_decode_image_bytes_reasons():
  assert decode_image_bytes(None)[1][0] == "missing_image"
  for raw, reason in _damaged_files(None).values():
    image, (got, detail) = decode_image_bytes(raw)
    assert image is None and got == reason and detail, (reason, detail)
  image, bad = decode_image_bytes(_encoded(GOOD["gray16.png"][0]))
  assert bad is None and image.mode == "RGB"
  with warnings.catch_warnings():   # where warnings are errors (python -W error)
    warnings.simplefilter("error")
    assert decode_image_bytes(_png_header(10_000, 10_000))[1][0] == "decompression_bomb"


def test_clip_caption_keeps_the_tokens(tok):
  text = "a small green triangle\tleft of  an orange circle\n" * 2500   # 125 kB
  clipped = decoding.clip_caption(text, L)
  assert len(clipped) <= 64 * L
  for a, b in zip(tok.encode_one(clipped, L), tok.encode_one(text, L)):
    np.testing.assert_array_equal(a, b)
  assert decoding.clip_caption("short caption", L) == "short caption"
  # One 100 kB "word": cut at 64 characters per token.
  assert len(decoding.clip_caption("x" * 100_000, L)) == 64 * L


def test_malformed_lines_skipped_and_counted(tmp_path):
  (tmp_path / "a.png").write_bytes(_encoded(_noise()))
  good = [{"image": "a.png", "caption": f"caption {i}"} for i in range(50)]
  lines = (["\ufeff" + json.dumps(good[0])] + good[1:20] + ["{not json", "[1, 2]"]
           + good[20:] + [{"image": "a.png"}, {"image": 3, "caption": "x"}])
  path = _write_jsonl(tmp_path / "data.jsonl", lines)
  with open(path, "ab") as f:
    f.write(b'{"image": "a.png", "capt')   # a torn last line (the writer died)
  source = JsonlSource(path)
  assert len(source) == 50 and source.skipped == {"malformed_json": 3, "bad_fields": 2}
  assert [source[i]["caption"] for i in (0, 49)] == ["caption 0", "caption 49"]
  assert pipeline.skip_metrics(source)["data/skipped/malformed_json"] >= 3


def test_mostly_or_all_malformed_file_refused_in_one_line(tmp_path):
  path = _write_jsonl(tmp_path / "data.jsonl", [{"image": "a.png", "caption": "x"},
                                                "{not json", "also not", "nor this"])
  with pytest.raises(DataError, match=r"data\.jsonl:2: malformed JSON.*3 of 4 lines") as e:
    JsonlSource(path)
  assert "\n" not in str(e.value)
  path = _write_jsonl(tmp_path / "data.jsonl", ["{not json"] * 5)
  with pytest.raises(DataError, match=r"data\.jsonl:1: malformed JSON.*5 of 5") as e:
    JsonlSource(path)
  assert "\n" not in str(e.value)


def test_every_record_bad_stops_with_a_clear_error(tmp_path, tok):
  (tmp_path / "empty.png").write_bytes(b"")
  lines = [{"image": "missing.png" if i % 2 else "empty.png", "caption": f"c{i}"}
           for i in range(50)]
  source = JsonlSource(_write_jsonl(tmp_path / "data.jsonl", lines))
  it = data.make_train_iterator(source, global_batch_size=4, seed=0, image_size=S,
                                tokenizer=tok, max_text_len=L)
  start = time.perf_counter()
  with pytest.raises(DataError, match=r"no usable record: 50 records in a row were bad "
                                      r"\(25 empty_image, 25 missing_image") as e:
    next(it)
  assert "\n" not in str(e.value) and time.perf_counter() - start < 10
  with pytest.raises(DataError, match=r"all 50 records to evaluate were bad"):
    list(data.iterate_eval(source, batch_size=4, image_size=S, tokenizer=tok, max_text_len=L))


def test_vqa_and_nlvr2_jsonl_share_the_checks(tmp_path, tok):
  (tmp_path / "a.png").write_bytes(_encoded(PIL.Image.new("L", (S, S), 60)))
  (tmp_path / "t.png").write_bytes(_encoded(_noise())[:50])
  vqa_lines = [{"image": "a.png", "question": f"q{i}?", "answer": "yes"} for i in range(12)]
  vqa_lines += ["{not json", {"image": "a.png", "question": "\x07\x08", "answer": "no"},
                {"image": "t.png", "question": "q?", "answer": "no"}]
  vqa = VqaJsonlSource(_write_jsonl(tmp_path / "vqa.jsonl", vqa_lines))
  assert len(vqa) == 14 and vqa.skipped == {"malformed_json": 1}
  data.reset_skipped_records()
  assert len(_decode_all(vqa, tok)) == 12
  assert pipeline.skipped_by_reason() == {"binary_caption": 1, "truncated_image": 1}

  nlvr_lines = [{"left": "a.png", "right": "a.png", "sentence": f"s{i}", "label": True}
                for i in range(10)]
  nlvr_lines += [{"left": "a.png", "right": "gone.png", "sentence": "s", "label": False},
                 {"left": "a.png", "right": None, "sentence": "s", "label": False}]
  nlvr = Nlvr2JsonlSource(_write_jsonl(tmp_path / "nlvr.jsonl", nlvr_lines))
  assert len(nlvr) == 11 and nlvr.skipped == {"bad_fields": 1}
  data.reset_skipped_records()
  examples = _decode_all(nlvr, tok)
  assert len(examples) == 10 and pipeline.skipped_by_reason() == {"missing_image": 1}
  assert tuple(examples[0]["image2"][4, 4]) == (60, 60, 60)


def test_training_logs_the_skipped_records_by_reason(tmp_path):
  """A run on a JSONL set with damaged records trains, and metrics.jsonl counts
  them by reason (the build's malformed lines and the read-time skips)."""
  from clusjax.train.loop import train
  from tests.conftest import micro_config
  for name, (image, _) in GOOD.items():
    (tmp_path / name).write_bytes(_encoded(image, "JPEG" if name.endswith(".jpg") else "PNG"))
  (tmp_path / "empty.png").write_bytes(b"")
  lines = [{"image": name, "caption": f"a small red circle {i}"}
           for i, name in enumerate(list(GOOD) * 6)]
  lines += [{"image": "empty.png", "caption": "a circle"}, {"image": "gone.png", "caption": "x"}] * 3
  lines += ["{not json"]
  path = _write_jsonl(tmp_path / "train.jsonl", lines)
  config = micro_config(tmp_path / "tfds", data__name="jsonl", data__image_size=16,
                        data__eval_split="train", train__num_steps=2, train__checkpoint_every=2,
                        clustering__cluster_every=100, eval__evaluators=())
  config.data.jsonl.train = str(path)
  pipeline.reset_skipped_records()
  train(config, str(tmp_path / "workdir"))
  logged = [json.loads(line) for line in (tmp_path / "workdir" / "metrics.jsonl").read_text()
            .splitlines()]
  last = [m for m in logged if "loss" in m][-1]
  assert last["data/skipped/malformed_json"] == 1
  assert last["data/skipped/empty_image"] >= 1 and last["data/skipped/missing_image"] >= 1
