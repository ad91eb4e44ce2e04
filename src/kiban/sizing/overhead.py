"""Estimates of the memory an engine takes beyond weights and KV cache.

These are estimates, not measurements: a CUDA context and library workspaces
per process, the peak activations of the largest forward pass the engine
profiles or reserves for, and the logits of a batch. The device benchmark
(bench/device/kv_accuracy.py) measures the real figure for llama.cpp; engines
that size their cache from a fixed byte count (vLLM ``--kv-cache-memory-bytes``,
llama.cpp ``-c``) are exact on the KV side whatever this estimate says.
"""

from __future__ import annotations

from kiban.sizing.specs import ModelSpec
from kiban.sizing.units import MiB

#: CUDA context, cuBLAS/cuDNN workspaces and allocator slack of one torch process
#: (estimate; NVML shows 0.4-0.6 GiB for an idle torch process on Hopper)
TORCH_CUDA_CONTEXT_BYTES = 512 * MiB
#: CUDA graphs captured by vLLM/SGLang for decode batch sizes (estimate)
CUDA_GRAPHS_BYTES = 256 * MiB
#: CUDA context of a native process such as llama-server (estimate)
NATIVE_CUDA_CONTEXT_BYTES = 256 * MiB


def activation_bytes(spec: ModelSpec, tokens: int, tp: int = 1) -> int:
    """Peak activations of one forward pass over *tokens* tokens (16-bit, one layer live).

    The widest tensors are the MLP's gate+up output (2 x intermediate) and
    the attention's q/k/v/o (about 4 x hidden) per token.
    """
    width = (2 * spec.intermediate_size + 4 * spec.hidden_size) // tp
    return tokens * width * 2


def logits_bytes(spec: ModelSpec, rows: int) -> int:
    """float32 logits of *rows* sampled positions, with one working copy."""
    return rows * spec.vocab_size * 4 * 2
