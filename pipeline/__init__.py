"""edgesmith: distil a foundation model into a small, quantized, validated model for one edge device."""

__version__ = "0.1.0"
