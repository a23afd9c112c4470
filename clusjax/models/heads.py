"""Downstream heads on the fused CLS (paper Fig. 6d).

    VQA:   [image CLS, text CLS] of the fused (image, question)       [B, F]
    NLVR2: the same for (left, statement) and (right, statement), concatenated [B, 2F]
           --ClassifierHead--> logits [B, C] float32

ALBEF / VLMo's classifier: dense -> GELU -> LayerNorm -> dense.
"""
import flax.linen as nn
import jax.numpy as jnp

from clusjax.models.layers import LayerNorm, dense


class ClassifierHead(nn.Module):
  """features [B, F] -> logits [B, num_classes] float32 (an MLP with one hidden layer)."""
  num_classes: int
  hidden: int = 0                 # 0 = 2 x F
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    hidden = self.hidden or 2 * features.shape[-1]
    # "embed" on the input side only: the hidden width need not divide the mesh axes.
    h = dense(hidden, ("embed", None), dtype=self.dtype, name="hidden")(features)
    h = LayerNorm(1e-12, self.dtype, name="norm")(nn.gelu(h, approximate=False))
    return dense(self.num_classes, (None, None), dtype=self.dtype, float32_output=True,
                 name="out")(h)
