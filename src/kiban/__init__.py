"""kiban: one OpenAI-compatible endpoint in front of self-hosted inference engines."""

__version__ = "0.1.0"
