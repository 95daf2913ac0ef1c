"""The served directory's format: architecture names and the ``wsvd`` config block, checked at load.

No heavy imports: the vLLM plugin and model read this module, and so does the exporter.
"""

from __future__ import annotations

FORMAT = "wsvd-vllm"
FORMAT_VERSION = 1
ARCHITECTURES = {"llama": "WsvdLlamaForCausalLM", "mistral": "WsvdMistralForCausalLM", "qwen2": "WsvdQwen2ForCausalLM"}
GRANULARITIES = ("head", "projection", "joint")
# what vLLM's paged cache holds: "latent", per latent head and token [c_k | c_v] (head granularity: one latent
# head per kv head; projection: one for all); "dense", K and V rebuilt before vLLM's attention (phase 1; the
# only choice for joint factors, whose one latent feeds K and V). A block without the key is dense (format 1).
KV_CACHES = ("latent", "dense")
LATENT_GRANULARITIES = ("head", "projection")
LATENT_BACKEND = "WSVD_LATENT"  # the latent cache's attention backend, as the plugin registers it with vLLM


def latent_cache_layout(block: dict, layer: int, kv_heads: int) -> tuple[int, int, int]:
    """(latent heads n_lat, w_k, w_v) the latent cache holds per token of ``layer`` for ``kv_heads`` kv heads:
    per-head factors one latent head per kv head, a per-projection latent one for all."""
    widths = block["layers"][layer]
    return kv_heads if block["granularity"] == "head" else 1, widths["k"]["width"], widths["v"]["width"]


def check_block(block) -> dict:
    """The ``wsvd`` block of a served config, or ValueError naming the problem and the fix (vLLM shows it at load)."""
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        raise ValueError("config.json has no wsvd block of format 'wsvd-vllm': write the directory with "
                         "`wsvd export vllm ARTIFACT OUT`")
    version = block.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"config.json was exported in wsvd-vllm format version {version!r}; this wsvd-passes plugin "
                         f"reads up to version {FORMAT_VERSION}: upgrade wsvd-passes in the serving environment")
    if block.get("granularity") not in GRANULARITIES:
        raise ValueError(f"config.json's wsvd granularity {block.get('granularity')!r} is not one of "
                         f"{', '.join(GRANULARITIES)}: export the directory again")
    kv_cache = block.setdefault("kv_cache", "dense")
    if kv_cache not in KV_CACHES or (kv_cache == "latent" and block["granularity"] not in LATENT_GRANULARITIES):
        raise ValueError(f"config.json's wsvd kv_cache {kv_cache!r} with {block['granularity']} factors: the plugin "
                         f"serves a latent cache for {' and '.join(LATENT_GRANULARITIES)} factors, dense for any: "
                         "export the directory again")
    return block
