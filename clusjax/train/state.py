"""The train state and its sharded initialisation."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def dummy_batch(config, batch_size=1):
  """Zeros with the shapes and dtypes of one batch (for init and AOT lowering)."""
  size, length = config.data.image_size, config.data.max_text_len
  return dict(
      image=np.zeros((batch_size, size, size, 3), np.uint8),
      text_ids=np.zeros((batch_size, length), np.int32),
      text_mask=np.ones((batch_size, length), bool))


def _init_boxed(rng, model, tx, config):
  """State with params still boxed in nn.LogicallyPartitioned (for specs)."""
  batch = dummy_batch(config)
  init_rng, state_rng = jax.random.split(rng)
  params = model.init({"params": init_rng, "dropout": init_rng},
                      batch["image"], batch["text_ids"], batch["text_mask"])["params"]
  # The optimizer state mirrors the boxed params, so it inherits their axes.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=state_rng)


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
  return init(rng)
