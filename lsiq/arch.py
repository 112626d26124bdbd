"""What the methods need to know about a decoder block: kept importable for scripts; the
descriptors live in lsiq.archs (one module per model family, a registry keyed by model_type and a
generic fallback)."""

from lsiq.archs import BlockArch, UnsupportedArchitecture, family_for, supported_model_types

__all__ = ["BlockArch", "UnsupportedArchitecture", "family_for", "supported_model_types"]
