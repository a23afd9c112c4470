"""One raw pair -> the record a builder stores, or the reason it is skipped.

Shared by every builder and both engines (one process, Apache Beam), so a set
built either way holds the same records. Damage is classified by
`clusjax.data.damage` (the reasons the training pipeline counts too); this
module adds only what a build sees and a read does not:

  huge_image    more than `max_image_bytes` of encoded image (refused unread);
  huge_caption  a caption longer than MAX_CAPTION_CHARS characters;
  corrupt_shard a tar shard that cannot be read to its end (counted once per
                shard; the samples read before the damage are kept);
  duplicate     the same image bytes and captions as a record already kept
                (counted as `duplicates`, not as a skip).

Images are decoded once, shrunk so that the shorter side is at most
`image_size` (never enlarged) and re-encoded as JPEG (quality JPEG_QUALITY).
An RGB JPEG already small enough keeps its bytes: re-encoding it would only
lose quality a second time.
"""
import hashlib
import io

import PIL.Image

from clusjax.data.damage import caption_problem, decode_image_bytes

JPEG_QUALITY = 95
MAX_CAPTION_CHARS = 20_000        # a caption past this is no caption (a page, a dump)
DEFAULT_MAX_IMAGE_BYTES = 50 << 20


def content_hash(image_bytes, captions):
  """Hex SHA-256 of the encoded image and its captions: exact duplicates share it."""
  h = hashlib.sha256()
  h.update(len(image_bytes).to_bytes(8, "little"))
  h.update(image_bytes)
  for caption in captions:
    h.update(b"\0" + caption.encode("utf-8", "surrogatepass"))
  return h.hexdigest()


def text_of(raw):
  """bytes / str -> str; bytes that are not UTF-8 become U+FFFD (a binary caption)."""
  if isinstance(raw, (bytes, bytearray)):
    return bytes(raw).decode("utf-8", "replace")
  return raw


def _caption_reason(captions):
  """None when every caption is usable, else the first bad one's reason."""
  if not captions:
    return "empty_caption"
  for caption in captions:
    problem = caption_problem(caption)
    if problem:
      return problem
    if len(caption) > MAX_CAPTION_CHARS:
      return "huge_caption"
  return None


def resize_encode(pil, image_size, original, original_format):
  """RGB PIL image -> JPEG bytes with the shorter side <= image_size (0: kept)."""
  width, height = pil.size
  short = min(width, height)
  if image_size and short > image_size:
    scale = image_size / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    pil = pil.resize(size, PIL.Image.BICUBIC, reducing_gap=3.0)
  elif original_format == "JPEG":
    return original   # RGB (checked by the caller) and small already: no second loss
  out = io.BytesIO()
  pil.save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


def clean(image_bytes, captions, *, image_size, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES,
          drop_bad_captions=False):
  """A raw pair -> ((stored image bytes, captions, content hash), None) or (None, reason).

  captions: [str]. drop_bad_captions: with several captions per image (Karpathy),
  leave out the damaged ones and keep the image while one is left.
  """
  if image_bytes is None:
    return None, "missing_image"
  if max_image_bytes and len(image_bytes) > max_image_bytes:
    return None, "huge_image"
  captions = [c.strip() if isinstance(c, str) else c for c in captions]
  if drop_bad_captions:
    good = [c for c in captions if _caption_reason([c]) is None]
    captions = good or captions   # none left: the first bad one's reason below
  reason = _caption_reason(captions)
  if reason:
    return None, reason
  pil, bad = decode_image_bytes(image_bytes)
  if pil is None:
    return None, bad[0]
  with PIL.Image.open(io.BytesIO(image_bytes)) as header:   # reads the header only
    kept_format = header.format if header.mode == "RGB" else None
  stored = resize_encode(pil, image_size, image_bytes, kept_format)
  return (stored, captions, content_hash(image_bytes, captions)), None


def in_holdout(digest, fraction):
  """Whether the record with content hash `digest` goes to the held-out split:
  decided by the hash, so both engines (and every rerun) agree, and duplicates
  land in one split."""
  return fraction > 0 and int(digest[:8], 16) < fraction * (1 << 32)
