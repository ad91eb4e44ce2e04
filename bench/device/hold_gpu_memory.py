"""Hold all but LEAVE_GIB of one GPU's free memory, so that a plan no longer fits there.

Sized from what NVML reports free on that GPU (any card size), allocated with torch
(plain cudaMalloc through its caching allocator). Prints the GPU's memory before and
after, touches READY_FILE once the memory is held, and exits after SECONDS or on
SIGTERM. Device scripts use it to show the "plan does not fit" refusal:

    python3 bench/device/hold_gpu_memory.py --gpu 1 --leave-gib 10 --seconds 120 \
        --ready /tmp/hold.ready &
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

GiB = 1024**3


def nvml_memory(index: int) -> tuple[int, int, int]:
    """(total, used, free) bytes of GPU *index* as NVML reports them."""
    import pynvml

    pynvml.nvmlInit()
    info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
    return info.total, info.used, info.free


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU")
    parser.add_argument("--leave-gib", type=float, default=10.0, help="GiB to leave free")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--ready", type=Path, required=True, help="file touched once held")
    args = parser.parse_args()
    # CUDA numbers GPUs fastest first unless told otherwise; NVML by PCI bus
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    import torch

    total, used, free = nvml_memory(args.gpu)
    context = 1 * GiB  # what the CUDA context of this process takes, about
    size = max(0, free - int(args.leave_gib * GiB) - context)
    print(
        f"GPU {args.gpu}: total {total / GiB:.1f} GiB, used {used / GiB:.1f}, free "
        f"{free / GiB:.1f}; holding {size / GiB:.1f} GiB",
        flush=True,
    )
    held = torch.empty(size, dtype=torch.uint8, device=f"cuda:{args.gpu}")
    held.fill_(1)
    torch.cuda.synchronize()
    total, used, free = nvml_memory(args.gpu)
    print(f"GPU {args.gpu} now: used {used / GiB:.1f} GiB, free {free / GiB:.1f}", flush=True)
    args.ready.write_text(f"{free}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
