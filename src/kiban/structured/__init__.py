"""Structured output: request normalisation, schema features, validation, verification."""
