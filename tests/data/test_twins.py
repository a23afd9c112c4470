"""Place twins: an example's shapes at other places, beside it in a training batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusjax import data
from clusjax.config import ConfigError, validate
from clusjax.data import shapes, shapes_v2
from clusjax.data.twins import TwinBatches, TwinSource, make_twin, move_places, with_twins
from clusjax.train.objective import twin_exclusion
from clusjax.train.state import dummy_batch
from tests.conftest import micro_config
from tests.data.test_pipeline import tok  # noqa: F401 - fixture

SIZE = 32


class ExampleSource:
  """Records 0 .. n-1 of the shapes train split (v2, dark backgrounds), as arrays."""

  def __init__(self, n, backgrounds=("dark",)):
    self.records = [shapes.make_example("train", i, SIZE, backgrounds=backgrounds)
                    for i in range(n)]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def _template(record):
  """The caption template of a record (the one whose caption it is)."""
  attrs = [record[k] for k in ("kind", "colour", "size", "position")]
  return next(t for t in range(shapes.NUM_TEMPLATES)
              if shapes.caption_variants(*attrs, t, 1, record["background"])[0] ==
              record["caption"])


def _occupied_cells(image):
  """The positions whose cell holds something brighter than a dark background."""
  return {p for p in range(len(shapes.POSITIONS))
          if image[slice(*shapes.cell_bounds(p, SIZE)[:2]),
                   slice(*shapes.cell_bounds(p, SIZE)[2:])].max() > 90}


def test_a_twin_moves_every_shape_and_its_caption_says_where():
  source = ExampleSource(40)
  moved_any = 0
  for i, record in enumerate(source.records):
    twin = make_twin(record, i, image_size=SIZE, seed=0, backgrounds=("dark",))
    n = record["num_shapes"]
    for key in ("kind", "colour", "size"):
      np.testing.assert_array_equal(twin[key], record[key])
    new, old = twin["position"][:n], record["position"][:n]
    assert len(set(new.tolist())) == n and (new != old).any() and (twin["position"][n:] == -1).all()
    moved_any += int((new != old).sum())
    # The caption is the one the generator writes for the moved scene, same template.
    attrs = [twin[k] for k in ("kind", "colour", "size", "position")]
    assert twin["caption"] == shapes.caption_variants(*attrs, _template(record), 1, "black")[0]
    # The shapes are drawn in the new cells, nothing in the others.
    assert _occupied_cells(twin["image"]) == set(new.tolist()), (i, twin["caption"])
    assert _occupied_cells(record["image"]) == set(old.tolist())
    # A pure function of (seed, index, record).
    again = make_twin(record, i, image_size=SIZE, seed=0, backgrounds=("dark",))
    assert again["image"].tobytes() == twin["image"].tobytes()
  assert moved_any > 40
  other = make_twin(source.records[0], 0, image_size=SIZE, seed=1, backgrounds=("dark",))
  assert other["image"].tobytes() != make_twin(source.records[0], 0, image_size=SIZE, seed=0,
                                               backgrounds=("dark",))["image"].tobytes()


def test_move_places_swaps_two_shapes_in_one_pass():
  caption = "a small red circle on the left and a large blue square on the right."
  assert move_places(caption, [0, 1], [1, 0]) == (
      "a small red circle on the right and a large blue square on the left.")
  assert move_places("on the left there is a red cross.", [0], [4]) == (
      "in the center there is a red cross.")


def test_a_twin_keeps_the_background_and_every_shape_but_its_place():
  backgrounds = shapes_v2.BACKGROUNDS   # dark, noise, light
  records = [shapes.make_example("train", i, SIZE, backgrounds=backgrounds) for i in range(30)]
  assert {r["background"] for r in records} == {"black", "white"}
  corners = [(slice(0, 10), slice(0, 10)), (slice(0, 10), slice(-10, None)),
             (slice(-10, None), slice(0, 10)), (slice(-10, None), slice(-10, None))]
  for i, r in enumerate(records):
    twin = make_twin(r, i, image_size=SIZE, seed=0, backgrounds=backgrounds)
    for corner in corners:   # no shape is ever in a corner cell: the same pixels
      np.testing.assert_array_equal(twin["image"][corner], r["image"][corner])
    # One shape: the same pixels, moved from one cell to the other.
    if r["num_shapes"] == 1:
      old, new = (shapes.cell_bounds(int(p[0]), SIZE) for p in (r["position"], twin["position"]))
      drawn = (r["image"][old[0]:old[1], old[2]:old[3]].astype(int) -
               twin["image"][old[0]:old[1], old[2]:old[3]]).any(axis=-1).sum()
      moved = (twin["image"][new[0]:new[1], new[2]:new[3]].astype(int) -
               r["image"][new[0]:new[1], new[2]:new[3]]).any(axis=-1).sum()
      assert drawn >= 5 and abs(int(drawn) - int(moved)) <= 0.3 * drawn, (i, drawn, moved)


def test_twin_batches_put_each_twin_after_its_example():
  batches = TwinBatches(lambda step: np.arange(5) + 10 * step, 100, 3)
  np.testing.assert_array_equal(batches(1), [10, 110, 11, 111, 12, 112, 13, 14])
  source = TwinSource(ExampleSource(4), image_size=SIZE, seed=0, backgrounds=("dark",))
  assert len(source) == 8 and source.num_originals == 4
  assert source[6]["caption"] == make_twin(source[2], 2, image_size=SIZE, seed=0,
                                           backgrounds=("dark",))["caption"]
  with pytest.raises(IndexError, match="record 8 of 8"):
    source[8]


def test_train_batches_hold_pairs_of_an_example_and_its_twin(tok):  # noqa: F811
  base = ExampleSource(24)
  source = TwinSource(base, image_size=SIZE, seed=0, backgrounds=("dark",), pair_ids=True)
  it = data.make_train_iterator(source, global_batch_size=8, seed=0, image_size=SIZE,
                                tokenizer=tok, max_text_len=40, twin_pairs=3)
  images = {r["image"].tobytes(): i for i, r in enumerate(base.records)}
  seen = set()
  for _ in range(6):   # two epochs of 24 / 5 records
    batch = next(it)
    rows = [images.get(im.tobytes()) for im in batch["image"]]
    # Rows 0, 2, 4, 6, 7 are training records; 1, 3, 5 the twins of the row before.
    assert None not in [rows[j] for j in (0, 2, 4, 6, 7)]
    for j in (1, 3, 5):
      twin = source[source.num_originals + rows[j - 1]]
      assert batch["image"][j].tobytes() == twin["image"].tobytes()
      assert (batch["text_ids"][j] != batch["text_ids"][j - 1]).any()
    # "pair_id": the example's record index, on its row and its twin's; no other row's.
    originals = [0, 2, 4, 6, 7]
    assert batch["pair_id"].dtype == np.int32
    np.testing.assert_array_equal(batch["pair_id"][originals], [rows[j] for j in originals])
    np.testing.assert_array_equal(batch["pair_id"][[1, 3, 5]], batch["pair_id"][[0, 2, 4]])
    seen.update(rows[j] for j in (0, 2, 4, 6, 7))
  assert seen == set(range(24))


def test_twins_need_the_v2_renderer_and_only_the_built_in_shapes_get_them(tmp_path):
  for overrides, bad in ((dict(data__shapes_twins=1.5), "shapes_twins"),
                         (dict(data__shapes_twins=0.5, data__shapes_version=1), "version")):
    with pytest.raises(ConfigError, match=bad):
      validate(micro_config(tmp_path, **overrides))
  config = micro_config(tmp_path, data__shapes_twins=0.5)
  validate(config)
  source = ExampleSource(4)
  assert with_twins(source, config.data, 16)[1] == 4
  config.data.shapes_twins = 1.0   # an odd batch: 31 pairs and one example alone
  assert with_twins(source, config.data, 63)[1] == 31
  assert len(TwinBatches(lambda step: np.arange(63 - 31), 100, 31)(0)) == 63
  config.data.update(name="jsonl")   # a caption source of its own: no scenes to move
  assert with_twins(source, config.data, 16) == (source, 0)


def test_twin_negatives_schedule_is_a_share_and_pair_ids_come_with_twins(tmp_path):
  """loss.itm_twin_negatives: a share of the steps in [0, 1]; the batch carries
  "pair_id" exactly when there are twins (without them the share has nothing to act
  on, as shapes_twins on another source: :tiny's 0.55 still validates there)."""
  with pytest.raises(ConfigError, match="itm_twin_negatives=1.5 must be <= 1.0"):
    validate(micro_config(tmp_path, loss__itm_twin_negatives=1.5))
  config = micro_config(tmp_path, loss__itm_twin_negatives=0.0)
  validate(config)
  assert dummy_batch(config, 4)["pair_id"].shape == (4,)
  assert with_twins(ExampleSource(4), config.data, 16, pair_ids=True)[0].pair_ids
  config.loss.itm_twin_negatives = 1.0   # twins, but the step does not read pair_id
  assert "pair_id" not in dummy_batch(config, 4)
  config.loss.itm_twin_negatives = 0.5
  config.data.shapes_twins = 0.0
  validate(config)
  assert "pair_id" not in dummy_batch(config, 4)


def test_twin_negatives_stop_at_their_share_of_the_steps(tmp_path):
  """loss.itm_twin_negatives=0.5 of 6 steps: no pair excluded at steps 0-2, each row's
  twin (same pair_id) from step 3 on; the step may be traced (one compiled step)."""
  config = micro_config(tmp_path, loss__itm_twin_negatives=0.5)
  batch = {"pair_id": jnp.array([4, 4, 9, 9, 1, 7], jnp.int32)}
  twins = np.zeros((6, 6), bool)
  for r, c in ((0, 1), (1, 0), (2, 3), (3, 2)):
    twins[r, c] = True
  exclusion = jax.jit(lambda step: twin_exclusion(batch, config, step))
  for step in range(6):
    np.testing.assert_array_equal(exclusion(jnp.int32(step)), twins & (step >= 3))
  config.loss.itm_twin_negatives = 1.0   # throughout: nothing to exclude, no step needed
  assert twin_exclusion(batch, config, None) is None
  config.loss.itm_twin_negatives = 0.5
  assert twin_exclusion({}, config, 3) is None   # a batch without twins
  # Outside a train step (no step): as at step 0.
  np.testing.assert_array_equal(twin_exclusion(batch, config, None), np.zeros((6, 6), bool))
  config.loss.itm_twin_negatives = 0.0
  np.testing.assert_array_equal(twin_exclusion(batch, config, None), twins)
