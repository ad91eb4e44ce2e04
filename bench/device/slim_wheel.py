"""Repack an engine wheel without the parts a run on one Hopper GPU never loads.

The device takes 64 MiB per call; vLLM 0.26.0's wheel is 290 MB and lmdeploy
0.18.0's 107 MB, mostly native kernels that this run does not need. The repacked
wheel keeps its name (pip installs it as the same version) and a RECORD without the
removed files, so pip installs it cleanly.

    python3 bench/device/slim_wheel.py vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl OUTDIR
    python3 bench/device/slim_wheel.py lmdeploy-0.18.0-cp312-cp312-manylinux_2_28_x86_64.whl OUTDIR

What goes, and why it is safe (read in the wheels' own code):

vLLM 0.26.0 (on sm_90 with a dense model):
* ``vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so``: flash_attn_interface.py imports FA2 and
  FA3 each under ``try``; fa_utils.get_flash_attn_version picks FA3 on compute
  capability 9 (fp8 KV included), FA2 only for ALiBi, XPU or older GPUs.
* ``vllm/_moe_C_stable_libtorch.abi3.so``: platforms/cuda.py imports it under
  ``contextlib.suppress(ImportError)``; only mixture-of-experts layers call it.
* ``vllm/_flashmla_C.abi3.so``, ``vllm/_qutlass_C.abi3.so``: MLA models (DeepSeek) and
  NVFP4/MXFP4 quantization only; both imported under suppress/try.
* ``vllm/vllm-rs``: the Rust frontend, used only with VLLM_USE_RUST_FRONTEND=1 (envs.py).
* ``vllm/third_party/``: DeepGEMM and the SM100 FMHA sources (JIT-compiled fp8 block GEMM,
  Blackwell attention), found with find_spec and skipped when absent.

lmdeploy 0.18.0: ``lmdeploy/turbomind/_turbomind*.so`` and its libraries; turbomind/
__init__.py imports the extension under ``try`` and archs.py falls back to the PyTorch
engine (``--backend pytorch`` asks for it anyway).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import zipfile
from pathlib import Path

DROP = {
    "vllm": (
        "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
        "vllm/_moe_C_stable_libtorch.abi3.so",
        "vllm/_flashmla_C.abi3.so",
        "vllm/_flashmla_extension_C.abi3.so",
        "vllm/_qutlass_C.abi3.so",
        "vllm/vllm-rs",
        "vllm/third_party/*",
    ),
    "lmdeploy": (
        "lmdeploy/turbomind/_turbomind*.so",
        "lmdeploy/turbomind/lib/*",
        "lmdeploy/turbomind/lib64/*",
    ),
}


def slim(wheel: Path, out_dir: Path) -> Path:
    """Write the repacked wheel into *out_dir*; returns its path."""
    project = wheel.name.split("-")[0]
    patterns = DROP.get(project)
    if patterns is None:
        raise SystemExit(f"no list of parts to drop for {project!r}; known: {sorted(DROP)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w") as dst:
        members = src.infolist()
        dropped = [i for i in members if any(fnmatch.fnmatch(i.filename, p) for p in patterns)]
        gone = {i.filename for i in dropped}
        for info in members:
            if info.filename in gone:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [x for x in data.decode().splitlines() if x.split(",")[0] not in gone]
                data = ("\n".join(kept) + "\n").encode()
            dst.writestr(info, data, compress_type=info.compress_type)
    saved = sum(i.compress_size for i in dropped)
    print(
        f"{target}: {target.stat().st_size / 2**20:.1f} MiB "
        f"(was {wheel.stat().st_size / 2**20:.1f}; dropped {len(dropped)} files, "
        f"{saved / 2**20:.1f} MiB compressed)"
    )
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    slim(args.wheel, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
