"""Random-weight Llama checkpoints of real shapes, written one safetensors shard per layer (for streaming benchmarks).

Weights are N(0, 0.02) (RMSNorm gains 1), in ``dtype``; memory never holds more than one layer. A byte-level
tokenizer (ByT5) is saved beside them, so ``wsvd compress --stream --model DIR`` runs on the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4),
    "llama-2-7b": (4096, 11008, 32, 32, 32),
}


def write_random_checkpoint(path: str | Path, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                            vocab: int = 32000, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """Write the checkpoint to ``path``; returns its weight bytes."""
    import transformers
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                      max_position_embeddings=4096, tie_word_embeddings=False, dtype=str(dtype)[6:])
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    shards: dict[str, list[str]] = {}
    for name in skeleton.state_dict():
        part = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name.rsplit(".", 1)[0]
        shards.setdefault(part, []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, (part, names) in enumerate(shards.items()):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = skeleton.get_parameter(name).shape
            value = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=generator) * 0.02
            tensors[name] = value.to(dtype)
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = file
        save_file(tensors, out / file, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    transformers.ByT5Tokenizer().save_pretrained(out)
    return total
