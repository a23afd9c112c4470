"""Clus: ViT + BERT towers, ITC heads, co-attention fusion, ITM/MLM heads, prototypes.

    images [B, H, W, 3] uint8 --ViT--> tokens --CLS--> vision_proj --> L2 norm --> [B, E]
    ids, mask [B, L]          --BERT--> tokens --CLS--> text_proj  --> L2 norm --> [B, E]
    (image tokens, text tokens) --fusion--> fused streams
    (image feats, text feats) . Z / tau_z --> (V_T, V_I) [B, K_max] --LongNet--> pool [B, W]
        [fused CLS of both streams, LongNet pool] --itm_head--> [B, 2]   (match / no match)
        fused text tokens         --mlm_head--> [B, L, V]   (masked-token logits)
        [fused CLS of both streams] (NLVR2: of both pairs) --task_head--> [B, C]   (vqa, nlvr2)
    prototypes Z [E, K_max], unit columns (clustering swap prediction, DESIGN §3)

The training objectives live in clusjax/train/step.py; this module only
defines the networks. `__call__` runs the two towers (what ITC and the swap
loss need) and returns their tokens for the fusion methods.

The towers have the architecture of Hugging Face ViTModel / BertModel so
weights move to and from PyTorch by re-keying (clusjax/export).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clusjax.config import itc_kind
from clusjax.losses.itc import SIGLIP_BIAS_INIT, SIGLIP_LOG_TEMPERATURE_INIT
from clusjax.models.bert import BertEncoder
from clusjax.models.fusion import FusionEncoder
from clusjax.models.heads import ClassifierHead
from clusjax.models.layers import LayerNorm, default_init, dense
from clusjax.models.longnet import LongNet
from clusjax.models.vit import ViT

# HF ViTImageProcessor's defaults: x / 255, then (x - 0.5) / 0.5.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def preprocess_images(images):
  """uint8 [B, H, W, 3] -> float32 in [-1, 1], as HF ViTImageProcessor does."""
  return (images.astype(jnp.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD


def _l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _unit_columns_init(key, shape, dtype=jnp.float32):
  z = jax.random.normal(key, shape, dtype)
  return z / jnp.linalg.norm(z, axis=0, keepdims=True)


class ClusModel(nn.Module):
  """The Clus networks; `__call__` returns the normalised ITC features and tokens."""
  config: ml_collections.FrozenConfigDict   # the run config's `model` section
  vocab_size: int
  max_text_len: int
  num_prototypes: int = 1                    # K_max, columns of Z
  # The run config's `longnet` section (None or depth 0: the ITM head reads the fused CLS only).
  longnet: ml_collections.FrozenConfigDict | None = None
  cluster_temperature: float = 0.1           # tau_z of V_T, V_I (config.clustering.temperature)
  siglip: bool = False                       # SigLIP's log temperature and bias (loss.itc.kind)
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"                        # config.remat, for every transformer block
  scan_layers: bool = False                  # config.scan_layers: tower, fusion stacks as lax.scan
  task: str = "pretrain"                     # config.task; vqa / nlvr2 add `task_head`
  num_classes: int = 0                       # the task head's outputs (0: no head)
  head_hidden: int = 0                       # its hidden width (0 = 2 x its input's)
  head_product: bool = False                 # the head also reads image CLS * text CLS

  def setup(self):
    cfg = self.config
    self.vision = ViT(
        patch_size=cfg.vision.patch_size, width=cfg.vision.width, depth=cfg.vision.depth,
        num_heads=cfg.vision.num_heads, mlp_dim=cfg.vision.mlp_dim, dropout=cfg.dropout,
        dtype=self.dtype, remat=self.remat, scan_layers=self.scan_layers,
        stem=cfg.vision.get("stem", "patch"), stem_max_cls=cfg.vision.get("stem_max_cls", False),
        stem_width=cfg.vision.get("stem_width", 0))
    self.text = BertEncoder(
        vocab_size=self.vocab_size, width=cfg.text.width, depth=cfg.text.depth,
        num_heads=cfg.text.num_heads, mlp_dim=cfg.text.mlp_dim, max_len=self.max_text_len,
        dropout=cfg.dropout, dtype=self.dtype, remat=self.remat, scan_layers=self.scan_layers)
    self.vision_proj = self._projection("vision_proj")
    self.text_proj = self._projection("text_proj")
    self.temperature = self.param(
        "temperature", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.temperature_init), ()), (), jnp.float32)
    if self.siglip:
      self.siglip_log_temperature, self.siglip_bias = (
          self.param(name, nn.with_logical_partitioning(nn.initializers.constant(init), ()),
                     (), jnp.float32)
          for name, init in (("siglip_log_temperature", SIGLIP_LOG_TEMPERATURE_INIT),
                             ("siglip_bias", SIGLIP_BIAS_INIT)))
    self.prototypes = self.param(
        "prototypes", nn.with_logical_partitioning(_unit_columns_init, ("proj", None)),
        (cfg.embed_dim, self.num_prototypes), jnp.float32)
    self.fusion = FusionEncoder(
        kind=cfg.fusion, depth=cfg.fusion_depth, num_heads=cfg.text.num_heads,
        mlp_dim=cfg.text.mlp_dim, dropout=cfg.dropout, dtype=self.dtype, remat=self.remat,
        scan_layers=self.scan_layers)
    self.cluster_encoder = None
    if self.longnet is not None and self.longnet.depth > 0:
      ln = self.longnet
      self.cluster_encoder = LongNet(
          width=ln.width, depth=ln.depth, num_heads=ln.num_heads, mlp_dim=ln.mlp_dim,
          max_clusters=self.num_prototypes, segment_lengths=tuple(ln.segment_lengths),
          dilation_rates=tuple(ln.dilation_rates), dense=not ln.enabled,
          implementation=ln.implementation, dropout=cfg.dropout, dtype=self.dtype,
          remat=self.remat, name="longnet")
    # ITM: match / no-match from the two fused CLS tokens (with model.itm_head_product also
    # their product, and the LongNet pool), concatenated.
    # Both heads give float32 logits (the softmax's input is never rounded to bf16).
    self.itm_head = dense(2, ("embed", None), dtype=self.dtype, float32_output=True,
                          name="itm_head")
    if cfg.get("itm_itc_residual", False):
      # The match log-odds start from the pair's ITC logit (this scale x cosine, no
      # gradient into the towers): the head learns what ITC gets wrong.
      self.itm_itc_scale = self.param(
          "itm_itc_scale", nn.with_logical_partitioning(
              nn.initializers.constant(1.0 / cfg.temperature_init), ()), (), jnp.float32)
    # MLM: BERT's prediction head (dense, GELU, LayerNorm, decoder over the vocabulary).
    self.mlm_transform = dense(cfg.text.width, ("embed", "mlp"), dtype=self.dtype,
                               name="mlm_transform")
    self.mlm_norm = LayerNorm(1e-12, self.dtype, name="mlm_norm")
    self.mlm_decoder = dense(self.vocab_size, ("embed", "vocab"), dtype=self.dtype,
                             kernel_init=default_init, float32_output=True, name="mlm_decoder")
    if self.num_classes:
      self.task_head = ClassifierHead(self.num_classes, self.head_hidden, self.dtype,
                                      name="task_head")

  def _projection(self, name):
    return nn.Dense(
        self.config.embed_dim, dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "proj")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("proj",)))

  def encode_image(self, images, deterministic=True):
    """uint8 [B, H, W, 3] -> (tokens [B, 1+N, Wv], features [B, E] float32, unit norm)."""
    tokens = self.vision(preprocess_images(images).astype(self.dtype),
                         deterministic=deterministic)
    return tokens, _l2_normalize(self.vision_proj(tokens[:, 0]))

  def encode_text(self, ids, mask, deterministic=True):
    """ids int32 [B, L], mask bool [B, L] -> (tokens [B, L, Wt], features [B, E])."""
    tokens = self.text(ids, mask, deterministic=deterministic)
    return tokens, _l2_normalize(self.text_proj(tokens[:, 0]))

  def unit_prototypes(self):
    """Z [E, K_max] with its columns L2-normalised in the forward pass."""
    return _l2_normalize(self.prototypes.T).T

  def itm_logits(self, image_tokens, text_tokens, text_mask, image_feats=None, text_feats=None,
                 active=None, deterministic=True):
    """Fuses pair i = (image i, text i) -> match logits [B, 2] float32.

    With LongNet (config.longnet.depth > 0) the pair's ITC features
    image_feats, text_feats [B, E] and the prototypes' `active` mask [K_max]
    give its cluster tokens: V_T = F_I Z / tau_z, V_I = F_T Z / tau_z (DESIGN §3-4).
    With config.model.itm_itc_residual the match logit also gets their cosine times a
    learned scale (ITM as a correction of ITC).
    """
    img, txt = self.fusion(image_tokens, text_tokens, text_mask, deterministic, outputs="cls")
    parts = [img[:, 0], txt[:, 0]]
    if self.config.get("itm_head_product", False):
      parts.append(self._cls_product(img[:, 0], txt[:, 0], "model.itm_head_product"))
    if self.cluster_encoder is not None:
      if image_feats is None or text_feats is None or active is None:
        raise ValueError("itm_logits with LongNet needs image_feats, text_feats and active.")
      z = self.unit_prototypes()
      v_t = image_feats.astype(jnp.float32) @ z / self.cluster_temperature
      v_i = text_feats.astype(jnp.float32) @ z / self.cluster_temperature
      parts.append(self.cluster_encoder(v_t, v_i, active, deterministic).astype(img.dtype))
    logits = self.itm_head(jnp.concatenate(parts, axis=-1))
    if self.config.get("itm_itc_residual", False):
      if image_feats is None or text_feats is None:
        raise ValueError("itm_logits with model.itm_itc_residual needs image_feats and text_feats.")
      cosine = jnp.sum(jax.lax.stop_gradient(image_feats.astype(jnp.float32) *
                                             text_feats.astype(jnp.float32)), axis=-1)
      logits = logits.at[:, 1].add(self.itm_itc_scale * cosine)
    return logits

  @staticmethod
  def _cls_product(image_cls, text_cls, key):
    """image CLS * text CLS [B, W]: a bilinear term for a head on the fused CLS. Whether
    a word and the image agree is a product of the two streams, which a head on their
    concatenation (ITM's is linear; a task head's one hidden layer) learns slowly or
    not at all (VQA heads since Antol et al. 2015 multiply them)."""
    if image_cls.shape[-1] != text_cls.shape[-1]:
      raise ValueError(f"config.{key}=True needs fused streams of one width "
                       f"(config.model.vision.width = config.model.text.width); the image "
                       f"stream has {image_cls.shape[-1]}, the text stream {text_cls.shape[-1]}.")
    return image_cls * text_cls

  def mlm_logits(self, image_tokens, ids, mask, deterministic=True):
    """Encodes (masked) ids, fuses them with the images -> logits [B, L, V] float32."""
    text_tokens, _ = self.encode_text(ids, mask, deterministic)
    _, txt = self.fusion(image_tokens, text_tokens, mask, deterministic, outputs="text")
    return self._token_logits(txt)

  def _token_logits(self, txt):
    """The MLM head: fused text tokens [B, L, Wt] -> logits [B, L, V] float32."""
    h = nn.gelu(self.mlm_transform(txt), approximate=False)
    return self.mlm_decoder(self.mlm_norm(h))

  def caption_logits(self, image_tokens, ids, mask, deterministic=True):
    """Captioning's seq2seq forward (paper Fig. 6e; UniLM / VLMo masked fine-tuning):
    image tokens [B, Li, Wv] (`encode_image`), ids / mask [B, L] (some ids [MASK])
    -> logits [B, L, V] float32 from the MLM head. Text position i sees every image
    token and the text positions <= i (`seq2seq_mask`), in the text tower and in
    the fusion's text stream (FusionEncoder outputs="caption")."""
    causal = seq2seq_mask(mask)
    text = self.text(ids, causal, deterministic)
    _, txt = self.fusion(image_tokens, text, causal, deterministic, outputs="caption")
    return self._token_logits(txt)

  def caption_step(self, image_tokens, ids, index, cache):
    """One decoding step of `caption_logits` with per-layer key/value caches.

    image_tokens [B, Li, Wv]; ids int32 [B, n] at positions index .. index + n - 1;
    cache: `empty_caption_cache`'s layout, holding the keys/values of the positions
    before `index` (and, after the first call, the cross-attention's of the image).
    Returns (logits [B, n, V] float32, the updated cache): what `caption_logits`
    gives at those positions for the same tokens before them.
    """
    n = ids.shape[1]
    length = cache["text"][0]["self"]["k"].shape[1]
    query_pos = index + jnp.arange(n)
    visible = jnp.arange(length)[None, :] <= query_pos[:, None]   # causal: [n, Lc]
    mask = jnp.broadcast_to(visible, (ids.shape[0], n, length))
    text, text_cache = self.text(ids, mask, positions=query_pos[None], cache=cache["text"],
                                 cache_index=index)
    _, txt, fusion_cache = self.fusion(image_tokens, text, mask, outputs="caption",
                                       cache=cache["fusion"], cache_index=index)
    return self._token_logits(txt), {"text": text_cache, "fusion": fusion_cache}

  def task_features(self, image_tokens, text_tokens, text_mask, image2_tokens=None,
                    deterministic=True):
    """The fused CLS of both streams, [B, Wv + Wt] (head_product: and their elementwise
    product, [B, 3 W]); with image2_tokens (NLVR2) the pairs (image, text) and
    (image2, text) fused apart and concatenated, [B, 2 (Wv + Wt)] ([B, 6 W])."""
    def fused(tokens):
      img, txt = self.fusion(tokens, text_tokens, text_mask, deterministic, outputs="cls")
      parts = [img[:, 0], txt[:, 0]]
      if self.head_product:
        parts.append(self._cls_product(img[:, 0], txt[:, 0], "finetune.head_product"))
      return jnp.concatenate(parts, axis=-1)
    if image2_tokens is None:
      return fused(image_tokens)
    return jnp.concatenate([fused(image_tokens), fused(image2_tokens)], axis=-1)

  def task_logits(self, features):
    """`task_features` [B, F] -> the task head's logits [B, num_classes] float32."""
    return self.task_head(features)

  def classify(self, images, ids, mask, images2=None, deterministic=True):
    """images (and NLVR2's images2) uint8 [B, H, W, 3], ids / mask [B, L] -> the task
    head's logits [B, num_classes] float32: towers, fusion, head in one call."""
    image_tokens, _ = self.encode_image(images, deterministic)
    text_tokens, _ = self.encode_text(ids, mask, deterministic)
    image2_tokens = None if images2 is None else self.encode_image(images2, deterministic)[0]
    return self.task_logits(self.task_features(image_tokens, text_tokens, mask, image2_tokens,
                                               deterministic))

  def __call__(self, images, ids, mask, deterministic=True):
    """The two towers: ITC features, tokens, temperature and unit-norm prototypes."""
    image_tokens, image_feats = self.encode_image(images, deterministic)
    text_tokens, text_feats = self.encode_text(ids, mask, deterministic)
    if self.is_initializing():
      # Creates the fusion and head params (the step calls them separately).
      self.itm_logits(image_tokens, text_tokens, mask, image_feats, text_feats,
                      jnp.ones((self.num_prototypes,), bool))
      self.mlm_logits(image_tokens, ids, mask)
      if self.num_classes:
        pair = image_tokens if self.task == "nlvr2" else None
        self.task_logits(self.task_features(image_tokens, text_tokens, mask, pair))
    out = dict(image_feats=image_feats, text_feats=text_feats, image_tokens=image_tokens,
               text_tokens=text_tokens, temperature=self.temperature,
               prototypes=self.unit_prototypes())
    if self.siglip:
      out.update(siglip_log_temperature=self.siglip_log_temperature, siglip_bias=self.siglip_bias)
    return out


def seq2seq_mask(mask):
  """Text key mask [B, L] -> per-query mask [B, L, L]: query i sees the real keys j <= i
  (captioning; the image tokens, in cross-attention, stay fully visible)."""
  mask = mask.astype(bool)
  length = mask.shape[1]
  causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  return causal[None] & mask[:, None, :]


def empty_caption_cache(model_config, batch, length, dtype=jnp.float32):
  """Zero key/value caches for `ClusModel.caption_step`: per text-tower layer
  {"self": {"k", "v"}}, per fusion text block {"self": ..., "cross": {}} (the
  cross-attention's keys/values of the image, computed by the first step), each
  [batch, length, heads, width / heads]."""
  text = model_config.text
  heads = text.num_heads   # the fusion blocks use the text tower's heads and width
  shape = (batch, length, heads, text.width // heads)

  def kv():
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return {"text": [{"self": kv()} for _ in range(text.depth)],
          "fusion": [{"self": kv(), "cross": {}} for _ in range(model_config.fusion_depth)]}


# The embedding table is padded to a multiple of this so that it splits evenly
# over the tensor axis (and aligns with TPU/GPU tiles); padded ids never occur.
VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size):
  return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_model(config, vocab_size):
  """The run config -> ClusModel (compute dtype config.dtype, block remat config.remat,
  layer stacks as scans for config.scan_layers)."""
  return ClusModel(config=ml_collections.FrozenConfigDict(config.model),
                   vocab_size=padded_vocab_size(vocab_size),
                   max_text_len=config.data.max_text_len,
                   num_prototypes=config.clustering.max_prototypes,
                   # Workdirs from before LongNet have no `longnet` section: none in ITM.
                   longnet=ml_collections.FrozenConfigDict(config.get("longnet", {"depth": 0})),
                   cluster_temperature=config.clustering.temperature,
                   siglip=itc_kind(config.loss) == "siglip",
                   dtype=jnp.dtype(config.dtype),
                   # Workdirs from before the key: no remat.
                   remat=config.get("remat", "none"),
                   scan_layers=config.get("scan_layers", False),
                   task=config.get("task", "pretrain"), num_classes=num_task_classes(config),
                   head_hidden=config.get("finetune", {}).get("head_hidden", 0),
                   head_product=config.get("finetune", {}).get("head_product", False))


def num_task_classes(config):
  """Outputs of the task head: VQA's answer vocabulary, NLVR2's true / false; 0 = none."""
  task = config.get("task", "pretrain")
  if task == "vqa":
    return config.finetune.num_answers
  return 2 if task == "nlvr2" else 0
