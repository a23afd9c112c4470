"""Pure loss functions: no state, no I/O."""
from clusjax.losses.itc import clip_temperature, itc_logits, itc_loss
from clusjax.losses.swap import swap_prediction_loss

__all__ = ["clip_temperature", "itc_logits", "itc_loss", "swap_prediction_loss"]
