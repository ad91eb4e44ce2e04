"""VRAM planning: model specs, KV-cache arithmetic, memory shares and engine flags."""
