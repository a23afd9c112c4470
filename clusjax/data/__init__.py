"""Data: the built-in captioned-shapes set, record sources, tokenizer, Grain pipelines."""
from clusjax.data.decoding import decode_record
from clusjax.data.pipeline import (iterate_eval, make_sampled_iterator, make_train_iterator,
                                   reset_skipped_records, skipped_records)
from clusjax.data.shapes import COLOUR_RGB, COLOURS, KINDS, POSITIONS, SIZES, make_split
from clusjax.data.shapes_tfds import CaptionedShapes, prepare_shapes
from clusjax.data.sources import JsonlSource, ShapesSource, TfdsSource, make_source
from clusjax.data.tokenizer import Tokenizer

__all__ = [
    "COLOUR_RGB", "COLOURS", "KINDS", "POSITIONS", "SIZES", "CaptionedShapes", "JsonlSource",
    "ShapesSource", "TfdsSource", "Tokenizer", "decode_record", "iterate_eval", "make_source",
    "make_sampled_iterator", "make_split", "make_train_iterator", "prepare_shapes",
    "reset_skipped_records", "skipped_records",
]
