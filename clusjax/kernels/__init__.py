"""Pallas kernels and the plain-JAX versions they must equal (DESIGN §4)."""
from clusjax.kernels.dilated_attention import dilated_attention
from clusjax.kernels.dilated_attention import dilated_attention_reference

__all__ = ["dilated_attention", "dilated_attention_reference"]
