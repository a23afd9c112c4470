"""Sources and Grain pipelines: decoding, bad records, sharding, state, eval batches."""
import io
import json

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest

from clusjax import data
from clusjax.data import shapes, shapes_tfds
from clusjax.data.sources import TfdsSource

S, L = 32, 24


def _config(data_dir, **overrides):
  # The keys config.data has (configs/clus_base.py), micro sizes as in tests/conftest.py.
  c = ml_collections.ConfigDict(dict(
      name="shapes", data_dir=str(data_dir), image_size=S, seed=0, shapes_num_train=256,
      shapes_num_val=16, shapes_num_test=64, shapes_version=2, tfds_name="", image_key="image",
      caption_key="caption", jsonl=dict(train="", val="", test=""), train_split="train",
      eval_split="test"))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  captions = shapes.make_split("train", 300, 16)["captions"] + ["item 0123456789"]
  return data.Tokenizer.train(captions, tmp_path_factory.mktemp("tok") / "t.model", 256)


class IndexSource:
  """Record i: an 8x8 image filled with value i, caption "item i"."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((8, 8, 3), i, np.uint8), "caption": f"item {i}"}


def _ids(batch):
  return batch["image"][:, 0, 0, 0].tolist()


def _train_iter(source, tok, **kw):
  args = dict(global_batch_size=8, seed=3, image_size=8, tokenizer=tok, max_text_len=L)
  args.update(kw)
  return data.make_train_iterator(source, **args)


def test_shapes_source_matches_make_split(shapes_data_dir, tok):
  source = data.make_source(_config(shapes_data_dir), "test")
  ref = shapes.make_split("test", 64, S)
  assert len(source) == 64
  record = source[5]
  assert record["caption"] == ref["captions"][5] and record["num_shapes"] == ref["num_shapes"][5]
  np.testing.assert_array_equal(record["colour"], ref["colour"][5])
  example = data.decode_record(record, image_size=S, tokenizer=tok, max_text_len=L)
  np.testing.assert_array_equal(example["image"], ref["images"][5])
  ids, mask = tok.encode_one(ref["captions"][5], L)
  np.testing.assert_array_equal(example["text_ids"], ids)
  np.testing.assert_array_equal(example["text_mask"], mask)


def test_decode_record_resizes_and_rejects_bad(tok):
  rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)
  png = io.BytesIO()
  PIL.Image.fromarray(rgb).save(png, format="PNG")
  ref = np.asarray(PIL.Image.fromarray(rgb).resize((S, S), PIL.Image.BICUBIC))
  for image in (rgb, png.getvalue()):
    out = data.decode_record({"image": image, "caption": "a red circle."}, image_size=S,
                             tokenizer=tok, max_text_len=L)
    assert out["image"].shape == (S, S, 3) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"], ref)
    assert out["text_ids"].dtype == np.int32 and out["text_mask"].dtype == bool
  grey = data.decode_record({"image": rgb[..., 0], "caption": "x"}, image_size=S, tokenizer=tok,
                            max_text_len=L)
  assert np.all(grey["image"][..., 0] == grey["image"][..., 2])
  for bad in ({"image": rgb, "caption": " \n"}, {"image": rgb, "caption": ""},
              {"image": None, "caption": "x"}, {"image": b"not an image", "caption": "x"},
              {"image": np.zeros((4, 4, 5), np.uint8), "caption": "x"},
              {"image": np.zeros((4,), np.uint8), "caption": "x"}):
    assert data.decode_record(bad, image_size=S, tokenizer=tok, max_text_len=L) is None


def test_large_jpegs_decode_at_a_dct_scale_close_to_a_full_decode(tok):
  """A JPEG over 8/7 of the image size is decoded at the smallest DCT scale that keeps
  both sides >= the size, then resized: within ~1 / 255 of Pillow's full decode +
  bicubic resize; smaller JPEGs are decoded in full (never scaled up)."""
  from clusjax.data import decoding
  y, x = np.mgrid[:120, :160]
  smooth = np.stack([x * 1.5, y * 2.0, 128 + 60 * np.sin(x / 9.0) * np.cos(y / 7.0)], -1)
  jpeg = io.BytesIO()
  PIL.Image.fromarray(smooth.clip(0, 255).astype(np.uint8)).save(jpeg, format="JPEG", quality=95)
  jpeg = jpeg.getvalue()
  assert decoding._fast_jpeg(jpeg, 30).shape == (30, 40, 3)      # 1/4 of 120 x 160
  assert decoding._fast_jpeg(jpeg, 100).shape == (105, 140, 3)   # 7/8
  assert decoding._fast_jpeg(jpeg, 130).shape == (120, 160, 3)   # a side < 130: full
  for size in (30, 100, 130):
    out = data.decode_record({"image": jpeg, "caption": "a red circle."}, image_size=size,
                             tokenizer=tok, max_text_len=L)["image"]
    ref = np.asarray(PIL.Image.open(io.BytesIO(jpeg)).convert("RGB").resize(
        (size, size), PIL.Image.BICUBIC))
    diff = np.abs(out.astype(int) - ref)
    assert out.shape == (size, size, 3) and diff.mean() < 1.0 and diff.max() < 12, (
        size, diff.mean(), diff.max())


def test_train_batches_and_restore_bit_exact(shapes_data_dir, tok, tmp_path):
  source = data.make_source(_config(shapes_data_dir), "train")
  make = lambda: data.make_train_iterator(  # noqa: E731
      source, global_batch_size=8, seed=1, image_size=S, tokenizer=tok, max_text_len=L)
  it = make()
  batches = [next(it) for _ in range(2)]
  state = it.get_state()
  json.dumps(state)  # JSON-safe
  batches += [next(it) for _ in range(3)]
  b = batches[0]
  assert b["image"].shape == (8, S, S, 3) and b["image"].dtype == np.uint8
  assert b["text_ids"].shape == (8, L) and b["text_ids"].dtype == np.int32
  assert b["text_mask"].shape == (8, L) and b["text_mask"].dtype == bool
  assert set(b) == {"image", "text_ids", "text_mask"}

  restored = make()
  restored.set_state(state)
  for want in batches[2:]:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])

  # The same through Orbax, as the training loop saves it.
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  it = make()
  for _ in range(2):
    next(it)
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  fresh = make()
  manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(next(fresh)["image"], batches[2]["image"])
  manager.close()


class SomeBadSource(IndexSource):
  """IndexSource whose records 3, 10, 17, ... have no image (skipped as missing_image)."""

  def __getitem__(self, i):
    return {"image": None, "caption": "x"} if i % 7 == 3 else super().__getitem__(i)


def test_worker_processes_give_the_batches_and_resume_of_the_main_process(tok, monkeypatch):
  """Grain worker processes decode chunks of consecutive positions; the batches (bad
  records dropped, the next ones filling in) are those of the in-process pipeline, and
  a state taken mid-chunk restores them exactly."""
  from clusjax.data import pipeline
  monkeypatch.setattr(pipeline, "WORKER_CHUNK", 5)   # 14 batches: 20+ chunks over 2 workers
  expected = _train_iter(SomeBadSource(70), tok)
  expected = [_ids(next(expected)) for _ in range(14)]
  assert not any(i % 7 == 3 for batch in expected for i in batch)
  it = _train_iter(SomeBadSource(70), tok, num_workers=2)
  got = [_ids(next(it)) for _ in range(5)]
  state = it.get_state()   # 40 good records in: 47 positions, inside a chunk
  got += [_ids(next(it)) for _ in range(9)]
  assert got == expected
  again = _train_iter(SomeBadSource(70), tok, num_workers=2)
  again.set_state(state)
  assert [_ids(next(again)) for _ in range(9)] == expected[5:]


def test_epochs_cover_the_data_and_are_reshuffled(tok):
  it = _train_iter(IndexSource(16), tok, global_batch_size=16)
  epochs = [_ids(next(it)) for _ in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(16))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != list(range(16))
  # Deterministic from the seed; another seed gives another order.
  assert _ids(next(_train_iter(IndexSource(16), tok, global_batch_size=16))) == epochs[0]
  assert _ids(next(_train_iter(IndexSource(16), tok, global_batch_size=16, seed=4))) != epochs[0]


def test_processes_read_their_rows_of_the_same_global_batches(tok):
  whole = _train_iter(IndexSource(33), tok, global_batch_size=8)
  parts = [_train_iter(IndexSource(33), tok, global_batch_size=8, process_index=p,
                       process_count=2) for p in range(2)]
  for _ in range(6):   # 48 > 33 records: across an epoch boundary
    rows = [_ids(next(it)) for it in parts]
    assert all(len(r) == 4 for r in rows)
    assert rows[0] + rows[1] == _ids(next(whole))
  with pytest.raises(ValueError, match="9.*2"):
    _train_iter(IndexSource(32), tok, global_batch_size=9, process_count=2)


def test_eval_order_padding_and_captions(shapes_data_dir, tok):
  source = data.make_source(_config(shapes_data_dir), "test")
  ref = shapes.make_split("test", 20, S)
  batches = list(data.iterate_eval(source, batch_size=8, image_size=S, tokenizer=tok,
                                   max_text_len=L, num_examples=20))
  assert [b["valid"].sum() for b in batches] == [8, 8, 4]
  assert all(b["image"].shape == (8, S, S, 3) and b["valid"].dtype == bool for b in batches)
  images = np.concatenate([b["image"][b["valid"]] for b in batches])
  np.testing.assert_array_equal(images, ref["images"])
  captions = [c for b in batches for c, v in zip(b["caption"], b["valid"]) if v]
  assert captions == ref["captions"]
  last = batches[-1]
  assert not last["image"][4:].any() and not last["text_mask"][4:].any()
  assert len(list(data.iterate_eval(source, batch_size=8, image_size=S, tokenizer=tok,
                                    max_text_len=L))) == 8  # all 64


def _write_jsonl(tmp_path, lines):
  path = tmp_path / "set" / "data.jsonl"
  path.parent.mkdir(exist_ok=True)
  path.write_text("\n".join(lines) + "\n")
  return path


def test_jsonl_bad_records_skipped_and_counted(tmp_path, tok):
  (tmp_path / "set" / "img").mkdir(parents=True)
  lines, colours = [], []
  for i in range(4):
    colour = (60 * i, 255 - 60 * i, 7)
    PIL.Image.fromarray(np.full((12, 12, 3), colour, np.uint8)).save(tmp_path / "set" / "img" / f"{i}.png")
    lines.append(json.dumps({"image": f"img/{i}.png", "caption": f"item {i}"}))
    colours.append(colour)
  lines.insert(1, json.dumps({"image": "img/missing.png", "caption": "item 9"}))
  lines.insert(3, json.dumps({"image": str(tmp_path / "set" / "img" / "0.png"), "caption": "  "}))
  config = _config(tmp_path, name="jsonl", jsonl=dict(train=str(_write_jsonl(tmp_path, lines)),
                                                     val="", test=""))
  source = data.make_source(config, "train")
  assert len(source) == 6

  before = data.skipped_records()
  batches = list(data.iterate_eval(source, batch_size=4, image_size=8, tokenizer=tok,
                                   max_text_len=L))
  assert data.skipped_records() - before == 2
  assert len(batches) == 1 and batches[0]["valid"].all()
  assert batches[0]["caption"] == [f"item {i}" for i in range(4)]
  assert [tuple(p) for p in batches[0]["image"][:, 4, 4]] == colours

  # Training: every batch holds only the 4 good records.
  it = data.make_train_iterator(source, global_batch_size=4, seed=0, image_size=8, tokenizer=tok,
                                max_text_len=L)
  for _ in range(3):
    assert sorted(tuple(p) for p in next(it)["image"][:, 4, 4]) == sorted(colours)
  assert data.skipped_records() - before >= 4


def test_jsonl_malformed_line_names_line(tmp_path):
  good = json.dumps({"image": "a.png", "caption": "x"})
  with pytest.raises(ValueError, match=r"data.jsonl:3: malformed JSON"):
    data.JsonlSource(_write_jsonl(tmp_path, [good, good, "{not json", good]))
  with pytest.raises(ValueError, match=r"data.jsonl:2: missing key.*caption"):
    data.JsonlSource(_write_jsonl(tmp_path, [good, json.dumps({"image": "a.png"})]))
  with pytest.raises(ValueError, match=r"config.data.jsonl.val"):
    data.make_source(_config(tmp_path, name="jsonl"), "val")


def test_make_source_errors_and_tfds(shapes_data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"config.data.name='webdataset'.*shapes"):
    data.make_source(_config(tmp_path, name="webdataset"), "train")
  with pytest.raises(FileNotFoundError, match=rf"(?s)coco_captions.*{tmp_path}.*tfds build"):
    data.make_source(_config(tmp_path, name="tfds", tfds_name="coco_captions"), "train")
  # name="tfds" reads any prepared ArrayRecord set from files, e.g. the shapes one.
  data.make_source(_config(shapes_data_dir), "train")  # make sure it is prepared
  tfds_name = "captioned_shapes/" + shapes_tfds.config_name(S, 256, 16, 64, 0)
  source = data.make_source(_config(shapes_data_dir, name="tfds", tfds_name=tfds_name), "val")
  assert len(source) == 16 and source[2]["caption"] == shapes.make_split("val", 3, S)["captions"][2]
  assert isinstance(source[2]["image"], bytes)


def test_tfds_nested_caption_key_takes_first():
  record = {"image": np.zeros((4, 4, 3), np.uint8),
            "captions": {"text": np.array([b"first one", b"second"], dtype=object),
                         "id": np.array([1, 2])}}
  source = TfdsSource([record], image_key="image", caption_key="captions/text")
  assert source[0]["caption"] == "first one"
