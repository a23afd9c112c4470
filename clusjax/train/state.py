"""The train state and its sharded initialisation."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clusjax.clustering import grow_prototypes
from clusjax.config import negative_groups, twin_ids_read
from clusjax.data.prompts import labeler_from_config, tagger_from_config
from clusjax.parallel.mesh import logical_shardings


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; all of it is checkpointed.

  `rng` is the run's base key: step s uses fold_in(rng, s), so a resumed
  run draws exactly the keys an uninterrupted one would.
  """
  step: jax.Array       # int32 []
  params: Any
  opt_state: Any
  rng: jax.Array        # uint32 [2], raw key data (checkpoint-friendly)
  active: jax.Array     # bool [K_max]: which prototype columns are clusters now
  queue: jax.Array      # float32 [Q, d_p]: recent image and text features (ring buffer)


def dummy_batch(config, batch_size=1):
  """Zeros with the shapes and dtypes of one batch (for init and AOT lowering)."""
  size, length = config.data.image_size, config.data.max_text_len
  batch = dict(
      image=np.zeros((batch_size, size, size, 3), np.uint8),
      text_ids=np.zeros((batch_size, length), np.int32),
      text_mask=np.ones((batch_size, length), bool))
  if negative_groups(config):
    batch.update(neg_text_ids=np.zeros((batch_size, length), np.int32),
                 neg_text_mask=np.ones((batch_size, length), bool),
                 neg_valid=np.ones((batch_size,), bool))
  labeler = labeler_from_config(config)
  if labeler is not None:
    k, label_len = labeler.num_nouns, labeler.max_text_len
    batch.update(label_ids=np.zeros((batch_size, k, label_len), np.int32),
                 label_mask=np.ones((batch_size, k, label_len), bool),
                 label_noun=np.ones((batch_size, k), np.int32),
                 caption_nouns=np.ones((batch_size, labeler.max_nouns), np.int32))
  if twin_ids_read(config):
    batch.update(pair_id=np.arange(batch_size, dtype=np.int32))
  if tagger_from_config(config) is not None:
    batch.update(tag_ids=np.zeros((batch_size, length), np.int32),
                 tag_mask=np.ones((batch_size, length), bool))
  task = config.get("task", "pretrain")   # the downstream targets (clusjax/data/tasks.py)
  if task == "vqa":
    batch.update(target_scores=np.zeros((batch_size, config.finetune.num_answers), np.float32),
                 label=np.zeros((batch_size,), np.int32))
  elif task == "nlvr2":
    batch.update(image2=np.zeros((batch_size, size, size, 3), np.uint8),
                 label=np.zeros((batch_size,), np.int32))
  return batch


def _init_boxed(rng, model, tx, config):
  """State with params still boxed in nn.LogicallyPartitioned (for specs)."""
  batch = dummy_batch(config)
  init_rng, state_rng = jax.random.split(rng)
  params = model.init({"params": init_rng, "dropout": init_rng},
                      batch["image"], batch["text_ids"], batch["text_mask"])["params"]
  # The optimizer state mirrors the boxed params, so it inherits their axes.
  k_max = config.clustering.max_prototypes
  active = jnp.arange(k_max) < config.clustering.num_prototypes
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=state_rng, active=active,
                    queue=jnp.zeros((config.clustering.queue_size, config.model.embed_dim),
                                    jnp.float32))


def abstract_state(model, tx, config, mesh, rules):
  """(ShapeDtypeStruct tree of the unboxed state, its NamedShardings)."""
  rng = jax.random.PRNGKey(config.seed)
  boxed = jax.eval_shape(lambda r: _init_boxed(r, model, tx, config), rng)
  shardings = logical_shardings(boxed, mesh, rules)
  shapes = nn.unbox(boxed)
  shapes = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  return shapes, shardings


def init_state(model, tx, config, shardings):
  """Initialises the state directly into its shardings (never whole on one device)."""
  rng = jax.random.PRNGKey(config.seed)
  init = jax.jit(lambda r: nn.unbox(_init_boxed(r, model, tx, config)),
                 out_shardings=shardings)
  state = init(rng)
  if config.model.text.get("init_from"):
    state = load_text_init(state, config.model.text.init_from)
  return state


# --- config.model.text.init_from: the text tower from a PyTorch BERT checkpoint ---

def load_text_init(state, path):
  """`state` with params['text'] replaced by the checkpoint at `path`, in place of the init.

  Each leaf keeps its sharding (every process reads the file and places its
  own shards). Adam's moments are zeros whatever the params, so opt_state
  stays as initialised.
  """
  from clusjax.export.import_bert import import_bert   # torch-free unless a .bin is read
  text = import_bert(path).text_tower_params(state.params["text"])
  text = jax.tree.map(
      lambda old, new: jax.make_array_from_callback(old.shape, old.sharding, lambda i: new[i]),
      state.params["text"], text)
  return state.replace(params={**state.params, "text": text})


def _path_has(path, key):
  return any(getattr(k, "key", None) == key for k in path)


def is_prototype_leaf(path):
  """True for a tree path under params["prototypes"] (or its optimizer state)."""
  return _path_has(path, "prototypes")


def _is_cluster_embed_leaf(path):
  """True under LongNet's cluster-index embedding [K_max, W] (params or optimizer state)."""
  return _path_has(path, "cluster_embed")


def grow_state(state, k_max):
  """`state` with K_max prototype columns: Z padded (clustering.grow_prototypes),
  `active` padded with False, LongNet's cluster-index embedding grown the same
  way (row j repeats row j mod the old K_max), and the optimizer state of both
  padded with zeros. The caller re-places it in the new shardings."""
  z, active = grow_prototypes(state.params["prototypes"], state.active, k_max)

  def grow_param(path, leaf):
    if _is_cluster_embed_leaf(path):
      return grow_prototypes(leaf.T, jnp.zeros(leaf.shape[0], bool), k_max)[0].T
    return leaf

  def pad(path, leaf):
    if is_prototype_leaf(path) and leaf.ndim == 2:
      return jnp.pad(leaf, ((0, 0), (0, k_max - leaf.shape[1])))
    if _is_cluster_embed_leaf(path) and leaf.ndim == 2:
      return jnp.pad(leaf, ((0, k_max - leaf.shape[0]), (0, 0)))
    return leaf

  params = jax.tree_util.tree_map_with_path(grow_param, {**state.params, "prototypes": z})
  return state.replace(params=params, active=active,
                       opt_state=jax.tree_util.tree_map_with_path(pad, state.opt_state))
