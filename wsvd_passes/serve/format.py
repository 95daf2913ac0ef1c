"""The served directory's format: architecture names and the ``wsvd`` config block, checked at load.

No heavy imports: the vLLM plugin and model read this module, and so does the exporter.
"""

from __future__ import annotations

FORMAT = "wsvd-vllm"
FORMAT_VERSION = 2  # 2: the online Hadamard is stored as its factors (orders [K, M1, M2] in the block)
ARCHITECTURES = {"llama": "WsvdLlamaForCausalLM", "mistral": "WsvdMistralForCausalLM", "qwen2": "WsvdQwen2ForCausalLM"}
GRANULARITIES = ("head", "projection", "joint")
# what vLLM's paged cache holds: "latent", per token and layer one latent head [c_k | c_v] of the real (unpadded)
# latent channels (latent_cache_layout; int8 codes and float32 scales for quantised latents, latent_cache_scales);
# "dense", K and V rebuilt before vLLM's attention (phase 1; the only
# choice for joint factors, whose one latent feeds K and V). A block without the key is dense (format 1).
KV_CACHES = ("latent", "dense")
LATENT_GRANULARITIES = ("head", "projection")
LATENT_BACKEND = "WSVD_LATENT"  # the latent cache's attention backend, as the plugin registers it with vLLM
SCALE_BYTES = 4  # a float32 scale of the int8 latent cache


def latent_cache_layout(block: dict, layer: int, tp_size: int = 1, tp_rank: int = 0) -> dict[str, tuple[list[int], int]]:
    """What the latent cache holds per token of ``layer`` on tensor-parallel rank ``tp_rank`` of ``tp_size``: one
    latent head [c_k | c_v]; for p in k, v, ``(channels, width)``: the columns of the rank's latent c_p kept, in
    order, then zeros up to ``width`` values.

    Per-head factors: the rank's n = n_kv / tp_size heads (global tp_rank n + h) give c_p [T, n w], head h's
    r_p,h real columns at h w .. h w + r_p,h - 1 and zeros to the layer's largest rank w (zero rows of D, zero
    columns of U); kept: the real columns, width: the largest sum_h r_p,h over the ranks (every rank declares
    the same page), sum_h r_p,h over all heads at tp_size 1. Per-projection: c_p [T, r_p], whole on every rank,
    all kept, width r_p. Read from the block's ranks alone (never from the tensors)."""
    layout = {}
    for p in ("k", "v"):
        ranks, w = block["layers"][layer][p]["ranks"], block["layers"][layer][p]["width"]
        if block["granularity"] != "head":
            layout[p] = list(range(w)), w
            continue
        n = len(ranks) // tp_size
        local = ranks[tp_rank * n:(tp_rank + 1) * n]
        layout[p] = [h * w + j for h, r in enumerate(local) for j in range(r)], \
            max(sum(ranks[t * n:(t + 1) * n]) for t in range(tp_size))
    return layout


def latent_cache_scales(block: dict, layer: int) -> dict[str, int]:
    """Scales per token of ``layer``'s latent cache, for p in k, v, when the recipe quantises activations to at most
    8 bits (``activation_bits``); {} otherwise (the cache holds the latents in the model dtype).

    The up-projections read c_p through the per-token activation quantiser (per token per kv head for per-head
    factors): c_p = codes * scale per group, exactly. The cache holds that: the int8 codes of the kept channels
    (``latent_cache_layout``) then the groups' float32 scales as ``SCALE_BYTES`` bytes each, n_kv groups for
    per-head factors, one for a per-projection latent (quantised models serve at tensor-parallel size 1)."""
    bits = block.get("activation_bits")
    if bits is None or bits > 8:
        return {}
    return {p: len(block["layers"][layer][p]["ranks"]) if block["granularity"] == "head" else 1 for p in ("k", "v")}


def latent_cache_heads(block: dict, layer: int, n_kv: int, tp_size: int = 1, tp_rank: int = 0) -> list[list[int]]:
    """Where each of the rank's ``n_kv`` kv heads finds its latents in a cache entry of ``layer``, as the paged kernel
    reads it: rows (k column, k rank, v column, v rank, k scale column, v scale column) [6][n_kv], in entry elements
    (bytes for an int8 cache; the scale columns unread by a float one).

    The entry is [c_k (width_k) | scales_k (SCALE_BYTES g_k) | c_v (width_v) | scales_v] (``latent_cache_layout``,
    ``latent_cache_scales``; no scales in a float cache). Per-head factors: head h's r_p,h real channels are
    consecutive in the packed c_p, its scale the h-th; a per-projection latent: column 0, rank r_p and the one scale
    for every head."""
    layout, scales = latent_cache_layout(block, layer, tp_size, tp_rank), latent_cache_scales(block, layer)
    rows, start = {}, 0
    for p in ("k", "v"):
        channels, width = layout[p]
        if block["granularity"] == "head":
            head = [c // block["layers"][layer][p]["width"] for c in channels]  # the local head of each kept channel
            ranks = [head.count(h) for h in range(n_kv)]
            cols = [start + (head.index(h) if ranks[h] else 0) for h in range(n_kv)]
            scale_cols = [start + width + SCALE_BYTES * h for h in range(n_kv)]
        else:
            ranks, cols, scale_cols = [width] * n_kv, [start] * n_kv, [start + width] * n_kv
        rows[p] = cols, ranks, scale_cols
        start += width + SCALE_BYTES * scales.get(p, 0)
    (cols_k, ranks_k, scales_k), (cols_v, ranks_v, scales_v) = rows["k"], rows["v"]
    return [cols_k, ranks_k, cols_v, ranks_v, scales_k, scales_v]


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
    hadamard = block.get("online_hadamard")
    if hadamard and not (isinstance(hadamard, list) and len(hadamard) == 3
                         and all(isinstance(n, int) and n > 0 for n in hadamard)):
        raise ValueError(f"config.json's wsvd online_hadamard {hadamard!r} is not the orders [K, M1, M2] of its "
                         "factors (format 1 stored a dense matrix): export the directory again with this wsvd-passes")
    kv_cache = block.setdefault("kv_cache", "dense")
    if kv_cache not in KV_CACHES or (kv_cache == "latent" and block["granularity"] not in LATENT_GRANULARITIES):
        raise ValueError(f"config.json's wsvd kv_cache {kv_cache!r} with {block['granularity']} factors: the plugin "
                         f"serves a latent cache for {' and '.join(LATENT_GRANULARITIES)} factors, dense for any: "
                         "export the directory again")
    return block
