"""Structured output as a library: constraints, schema features, relaxing, validation, verification.

It imports nothing of the gateway; one request's structured state (``StructuredService``,
``StructuredRequest``, the attempt plan) is the gateway's, in :mod:`kiban.gateway.structured`.
"""
