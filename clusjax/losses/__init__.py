"""Pure loss functions: no state, no I/O."""
from clusjax.losses.caption import caption_loss, caption_masking, smoothed_nll
from clusjax.losses.finetune import classification_loss, clce_loss, supcon_loss, vqa_loss
from clusjax.losses.itc import (clip_temperature, infonce_from_logits, itc_logits, itc_loss,
                                siglip_loss)
from clusjax.losses.itm import itm_loss, itm_pairs, sample_hard_negatives, twin_pairs
from clusjax.losses.mlm import mask_tokens, mlm_loss
from clusjax.losses.prompt import noun_codes, prompt_label_loss
from clusjax.losses.soft_targets import distillation_loss, kl_rows, softclip_loss
from clusjax.losses.swap import swap_prediction_loss

__all__ = ["caption_loss", "caption_masking", "classification_loss", "clce_loss",
           "clip_temperature", "distillation_loss", "infonce_from_logits", "itc_logits", "itc_loss", "itm_loss", "itm_pairs", "kl_rows",
           "mask_tokens", "mlm_loss", "noun_codes", "prompt_label_loss", "sample_hard_negatives",
           "siglip_loss", "smoothed_nll", "softclip_loss", "supcon_loss", "swap_prediction_loss",
           "twin_pairs", "vqa_loss"]
