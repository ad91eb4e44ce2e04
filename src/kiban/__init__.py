"""kiban: one OpenAI-compatible endpoint in front of self-hosted inference engines."""

from kiban.extract import ExtractionError, aextract, extract

__version__ = "0.1.0"  # the only place: pyproject.toml reads it from here
__all__ = ["ExtractionError", "aextract", "extract"]
