"""Write a random-weights Qwen2 model in HF format with a catalogue model's shapes.

On the device (no hub): Qwen2.5-7B-Instruct's shapes from kiban's catalogue, bf16
weights drawn on the GPU (normal, std 0.02; norms 1, biases 0), saved as safetensors
shards with an index, kiban's tiny byte-level BPE tokenizer (2,048 tokens, ChatML
template) and config.json. vLLM and lmdeploy load it as they load the real model;
the text is meaningless, which is all a memory and speed check needs.

    python3 bench/device/write_hf_model.py /tmp/qwen2.5-7b-random [--model NAME] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from kiban.models.tiny import (  # noqa: E402
    IM_END,
    PAD_TOKEN,
    TinySpec,
    _hf_config,
    _tokenizer_config,
    train_tokenizer,
)
from kiban.planning.hf_config import shape_fields  # noqa: E402
from kiban.sizing import catalogue  # noqa: E402

SHARD_BYTES = 4 * 1024**3


def spec_of(model: str) -> TinySpec:
    shape = shape_fields(catalogue.find_model(model).config)
    return TinySpec(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_layers=shape["num_layers"],
        num_heads=shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        max_position_embeddings=shape["max_context"],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct")
    parser.add_argument("--device", default="cuda", help="where to draw the weights")
    args = parser.parse_args()
    import torch
    from safetensors.torch import save_file

    started = time.perf_counter()
    spec = spec_of(args.model)
    dest = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(2048)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(spec, tok), indent=2))
    (dest / "config.json").write_text(json.dumps(_hf_config(spec, tok), indent=2))
    pad, eos = tok.token_to_id(PAD_TOKEN), tok.token_to_id(IM_END)
    generation = {"bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad}
    (dest / "generation_config.json").write_text(json.dumps(generation))
    generator = torch.Generator(device=args.device).manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in spec.hf_shapes().items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            tensor = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            values = torch.randn(shape, generator=generator, device=args.device)
            tensor = (values * spec.init_std).to(torch.bfloat16).cpu()
        nbytes = tensor.numel() * 2
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dest / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map |= {name: file for name in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    took = time.perf_counter() - started
    gb = total / 1e9
    print(f"{dest}: {args.model} shapes, {gb:.2f} GB bf16, {len(shards)} shards, {took:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
