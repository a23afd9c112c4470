"""Decoding one record: image bytes / array + caption -> uint8 [S, S, 3] and token ids.

Images: JPEGs by simplejpeg (at a DCT scale where the image is much larger than
S), anything else and damaged files by Pillow, any mode to RGB, bicubic resize
to a square; damage becomes a reason of `clusjax.data.damage` instead of an
exception. Captions are cut before tokenizing (`clip_caption`), so a 100 kB one
costs what a short one does. Used by the Grain pipelines (`clusjax.data.pipeline`).
"""
import numpy as np
import PIL.Image

from clusjax.data.damage import caption_problem, decode_image_bytes

try:
  import simplejpeg   # the fastest JPEG decoder measured (benchmarks/input_pipeline.py)
except ImportError:   # Pillow decodes everything then
  simplejpeg = None


def _fast_jpeg(data, image_size):
  """JPEG bytes -> uint8 [H, W, 3] by simplejpeg, or None to leave it to Pillow: not a
  JPEG, over PIL.Image.MAX_IMAGE_PIXELS, or any error (strict: a truncated file
  raises), so damage is classified by `decode_image_bytes` alone.

  simplejpeg decodes the same pixels as Pillow, 1.2-2x faster (benchmarks/RESULTS.md),
  and where both sides are at least 8/7 of image_size it decodes at the smallest
  DCT scale (7/8, 3/4, ..., 1/8: libjpeg-turbo's scaled IDCT, as Pillow's
  `draft` and TF's `decode_jpeg(ratio=...)`) that keeps both sides >= image_size:
  the bicubic resize that follows then starts from fewer pixels (a 341 x 256 JPEG
  for 224 px: 299 x 224, one resize pass instead of two; 640 x 480: 320 x 240).
  The result differs from a full decode + resize by about 1-2 / 255 per pixel.
  """
  if simplejpeg is None or bytes(data[:3]) != b"\xff\xd8\xff":
    return None
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit and height * width > limit:
      return None
    # Never scales up: a side under image_size keeps the full decode.
    return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True,
                                  min_height=image_size, min_width=image_size)
  except Exception:  # noqa: BLE001 - CMYK, corrupt, ...: Pillow decides
    return None


def _decode_image(image, image_size):
  """bytes (None: file missing) / uint8 array -> (uint8 [S, S, 3], None) or
  (None, (reason, detail)); reasons as in `clusjax.data.damage`."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    fast = _fast_jpeg(image, image_size)
    if fast is not None:
      image = fast   # an array: resized below
  if image is None or isinstance(image, (bytes, bytearray, memoryview)):
    pil, bad = decode_image_bytes(image)   # any mode -> RGB; damage -> a reason
    if pil is None:
      return None, bad
  else:
    array = np.asarray(image)
    if array.dtype != np.uint8:
      return None, ("bad_image_array", f"image array dtype {array.dtype} (want uint8)")
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
      array = array[..., :3]  # drop alpha
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)) or min(array.shape[:2]) == 0:
      return None, ("bad_image_array", f"image array of shape {array.shape} (want [H, W, 3])")
    if array.shape[:2] == (image_size, image_size):
      return np.stack([array] * 3, -1) if array.ndim == 2 else array, None
    pil = PIL.Image.fromarray(array)   # uint8 [H, W, 3]: RGB already
    if array.ndim == 2:
      pil = pil.convert("RGB")
  if pil.size != (image_size, image_size):
    # Plain resize to a square (no crop), as big_vision's `resize`.
    pil = pil.resize((image_size, image_size), PIL.Image.BICUBIC)
  return np.asarray(pil, np.uint8), None


# Characters per token beyond which `clip_caption` cuts regardless of words.
_CHARS_PER_TOKEN = 64


def clip_caption(caption, max_text_len):
  """The start of `caption` that tokenizes to the same first max_text_len tokens.

  A 100 kB caption would cost 30 ms of SentencePiece per record (and BPE's
  cost grows faster than the length) for tokens that are cut anyway.
  Tokenizers split at whitespace and every word gives at least one token, so
  the first max_text_len words are enough; only a caption whose words average
  over 64 characters is cut inside one. Short captions are returned as is.
  """
  limit = _CHARS_PER_TOKEN * max_text_len
  if len(caption) <= limit:
    return caption
  words = caption[:limit].split(maxsplit=max_text_len)   # the last item: the rest
  return " ".join(words[:max_text_len]) if len(words) > max_text_len else caption[:limit]


def decode_or_reason(record, image_size, tokenizer, max_text_len):
  """record -> ({image, text_ids, text_mask[, image2]}, None) or (None, (reason, detail)).

  A record with "image2" (NLVR2's right image) has both images decoded.
  """
  caption = record.get("caption")
  problem = caption_problem(caption)
  if problem:
    return None, (problem, f"caption {str(caption)[:40]!r}")
  out = {}
  for key in ("image", "image2") if "image2" in record else ("image",):
    out[key], bad = _decode_image(record.get(key), image_size)
    if out[key] is None:
      path = record.get(f"{key}_path")
      return None, (bad[0], bad[1] + (f" ({path})" if path else ""))
  out["text_ids"], out["text_mask"] = tokenizer.encode_one(clip_caption(caption, max_text_len),
                                                           max_text_len)
  return out, None


def decode_record(record, *, image_size, tokenizer, max_text_len):
  """One record -> dict or None for a bad record.

  Returns:
    {"image": uint8 [S, S, 3], "text_ids": int32 [L], "text_mask": bool [L]},
    or None (unreadable/missing image, empty caption, wrong array shape).
  """
  return decode_or_reason(record, image_size, tokenizer, max_text_len)[0]
