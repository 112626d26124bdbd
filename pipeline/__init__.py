"""Distributed, resumable block-by-block quantization pipeline built on Ray and `lsiq`."""
