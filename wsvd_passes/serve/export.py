"""``wsvd export vllm ARTIFACT OUT``: a compressed artifact as a Hugging Face-style directory vLLM serves.

Everything is read from the artifact's full-sequence graph (:func:`~wsvd_passes.artifacts.artifact.load`): the
factors through :func:`~wsvd_passes.graph.sites.find_sites` and the layout recorded on each up-projection
(:class:`~wsvd_passes.graph.factor_spec.FactorSpec`), RMSNorm gammas (or their absence once fused into the
readers) through :func:`~wsvd_passes.graph.residual.find_residual_stream`, activation quantisers from the
``fake_quant_activation`` node in front of each linear. Written to ``OUT``:

- ``config.json``: the base model's config with ``architectures: ["Wsvd<Family>ForCausalLM"]`` and a
  ``wsvd`` block (format version, recipe, granularity, per-layer per-projection ranks and latent width,
  activation bits, online Hadamard (its factor orders [K, M1, M2], or null), and ``kv_cache``: what vLLM's paged
  cache holds, ``latent`` or ``dense``);
- ``model.safetensors`` (:func:`write_weights`), Hugging Face names plus the factors as linears, for layer i
  and p in q, k, v (``attn = model.layers.{i}.self_attn``, E hidden, D head dim, w latent width per block)::

      head         {attn}.{p}_down.weight [n_p w, E]    {attn}.{p}_up.weight [n_p D, w]  (the diagonal blocks of U)
      projection   {attn}.{p}_down.weight [r_p, E]      {attn}.{p}_up.weight [n_p D, r_p]
      joint        {attn}.qkv_down.weight [r, E]        {attn}.{p}_up.weight [n_p D, r]
                   {attn}.{p}_up.bias [n_p D] (Qwen2);  model.layers.{i}.mlp.down_hadamard.{signs, k, m1, m2}
                   (rotated recipes: the factors of the online Hadamard before down_proj, I = K M1 M2,
                   :class:`~wsvd_passes.algorithms.hadamard.HadamardFactors`); RMSNorm weights of ones when the
                   gammas are fused;
                   ``lm_head.weight`` only when it differs from the embedding (tied embeddings are stored once; a
                   rotated tied head ``x G (E S1)^T`` is served untied as ``E S1 G``);

- the tokenizer files and chat template (``save_pretrained``).

Weights are written in float32, the artifact's own values: quantised weights are stored dequantised (their
float32 values are exact; bfloat16 would change them) until packed int8/int4 weights slot into
:func:`write_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.fx import GraphModule, Node

from ..algorithms.hadamard import FACTOR_NAMES, hadamard_rotate
from ..algorithms.quantize import fake_quant_activation
from ..errors import WsvdError
from ..graph.factor_spec import factor_spec, head_blocks
from ..graph.graph_utils import is_call, tensor_attr
from ..graph.residual import find_residual_stream
from ..graph.sites import AttentionSite, find_sites, module_path
from ..passes.rotate import TIED_GAMMA
from .format import ARCHITECTURES, FORMAT, FORMAT_VERSION, KV_CACHES, LATENT_GRANULARITIES

aten = torch.ops.aten

_CAPTURE_PREFIX = "model."  # the capture wraps the HF model as ``model`` (capture.CausalLMLogits)


def export_vllm(artifact: str | Path, out: str | Path, kv_cache: str | None = None) -> dict:
    """Write the vLLM directory of ``artifact`` to ``out``; returns the ``wsvd`` block of its config.

    ``kv_cache``: ``latent`` (vLLM's paged cache holds the real channels of the k/v latents: 2 n_kv D / (m_k + m_v)
    times the tokens, m_p = sum_h r_p,h for per-head factors, r_p for per-projection ones),
    ``dense`` (K and V, as vLLM caches any model), or None: latent where the factors allow it (per-head and
    per-projection), dense for joint factors."""
    from ..artifacts.artifact import load, read_manifest

    if kv_cache not in (None, *KV_CACHES):
        raise WsvdError(f"kv cache {kv_cache!r}: choose one of {', '.join(KV_CACHES)}")

    manifest = read_manifest(artifact)
    recipe = manifest["recipe"]
    if not recipe.get("factor", True):
        raise WsvdError(f"recipe {recipe['name']} has no low-rank factors: wsvd export vllm serves the factored "
                        "recipes (svd, asvd, svd-llm, qsvd-noq, wsvd-noft, wsvd-noq, qsvd, wsvd-noqat, wsvd)")
    from ..algorithms.quantize import parse_bits

    if parse_bits(manifest["bits"]).embedding < 16:
        raise WsvdError(f"{artifact} quantises the embedding and LM head ({manifest['bits']}), which the vLLM plugin "
                        "serves in float: export an artifact compressed without the e suffix (e.g. --bits w8a8)")
    art = load(artifact)
    config = art.model.config
    family = getattr(config, "model_type", None)
    if family not in ARCHITECTURES or getattr(config, "vision_config", None) is not None:
        raise WsvdError(f"{art.model.name} is a {family} model: wsvd export vllm supports the text decoders of the "
                        f"{', '.join(ARCHITECTURES)} families")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        raise WsvdError(f"{art.model.name} uses sliding-window attention ({window} tokens), which the vLLM plugin "
                        "does not reproduce: export a model without a sliding window")
    tensors, block = read_graph(art.captured.gm)
    latent_ok = block["granularity"] in LATENT_GRANULARITIES
    if kv_cache == "latent" and not latent_ok:
        raise WsvdError(f"{recipe['name']} has {block['granularity']} factors (one latent feeds K and V): the vLLM "
                        f"latent cache serves {' and '.join(LATENT_GRANULARITIES)} factors; export with --kv-cache dense")
    block.update(recipe=recipe["name"], bits=manifest["bits"], rho1=manifest.get("rho1"), rho2=manifest.get("rho2"),
                 kv_cache=kv_cache or ("latent" if latent_ok else "dense"))
    tied = "lm_head.weight" in tensors and torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    if tied:
        del tensors["lm_head.weight"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, tensors)
    hf = config.to_dict()
    hf.pop("quantization_config", None)
    hf.update(architectures=[ARCHITECTURES[family]], tie_word_embeddings=tied, dtype="float32", wsvd=block)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    art.model.tokenizer.save_pretrained(out)
    return block


def write_weights(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The one writer of the served weights (float32 safetensors; packed quantised weights go here later)."""
    stored, storages = {}, set()
    for name, value in tensors.items():
        value = value.detach().to("cpu", torch.float32).contiguous()
        if value.untyped_storage().data_ptr() in storages:  # vLLM loads each layer's tensor, and safetensors
            value = value.clone()                            # stores no shared memory (one online Hadamard)
        storages.add(value.untyped_storage().data_ptr())
        stored[name] = value
    save_file(stored, out / "model.safetensors", metadata={"format": "pt", "wsvd_format": FORMAT})


def read_graph(gm: GraphModule) -> tuple[dict[str, torch.Tensor], dict]:
    """(served weights by name, the ``wsvd`` config block) of a compressed full-sequence graph."""
    sites = find_sites(gm)
    granularity = factor_spec(sites[0].q_proj.node).granularity if sites[0].q_proj.factored else None
    tensors, layers, quant = {}, [], {}
    attention_nodes = set()
    for site in sites:
        layers.append(_read_site(gm, site, granularity, tensors, quant))
        attention_nodes |= {site.q_proj.node, site.k_proj.node, site.v_proj.node, site.q_proj.latent,
                            site.k_proj.latent, site.v_proj.latent}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    logits = set(output.all_input_nodes)
    hadamard = None
    for node in gm.graph.nodes:
        if is_call(node, aten.embedding.default):
            tensors[_name(module_path(node)) + ".weight"] = _get(gm, node.args[0])
        if is_call(node, hadamard_rotate):  # carries its writer's module path (OnlineHadamard)
            path = _name(module_path(node))
            if not path.endswith(".mlp.down_proj"):
                raise WsvdError(f"an online Hadamard sits before {path}; the vLLM plugin has one only before down_proj")
            factors = [_get(gm, arg) for arg in node.args[1:]]
            for part, tensor in zip(FACTOR_NAMES, factors):
                tensors[f"{path.removesuffix('_proj')}_hadamard.{part}"] = tensor
            hadamard = [f.shape[0] for f in factors[1:]]
        if not is_call(node, aten.linear.default) or node in attention_nodes or node.args[1].target.endswith(TIED_GAMMA):
            continue
        path = "lm_head" if node in logits else _name(module_path(node))
        if node not in logits:
            _record_quant(quant, path, node, None)
        _put_linear(gm, node, path, tensors)
        head_input = node.args[0]
        if node in logits and is_call(head_input, aten.linear.default) and head_input.args[1].target.endswith(TIED_GAMMA):
            # x G (E S1)^T = x (E S1 G)^T (G symmetric): vLLM's head reads the product, untied
            tensors["lm_head.weight"] = (tensors["lm_head.weight"].double() @ _get(gm, head_input.args[1]).double()).float()
    for norm in find_residual_stream(gm).norms:
        gamma = _get(gm, norm.gamma) if norm.gamma else torch.ones(sites[0].hidden_size)
        tensors[_name(module_path(norm.scaled)) + ".weight"] = gamma
    bits = set(quant.values()) - {None}
    if len(bits) > 1 or (bits and None in quant.values()):
        unquantised = sorted(k for k, v in quant.items() if v is None)[:1]
        raise WsvdError(f"the artifact quantises its linears' inputs unevenly ({sorted(bits)} bits"
                        f"{', ' + unquantised[0] + ' not at all' if unquantised else ''}); the vLLM plugin quantises "
                        "every linear but the LM head at one bit width: export a recipe from wsvd_passes.compression.recipes")
    site = sites[0]
    block = {"format": FORMAT, "format_version": FORMAT_VERSION, "granularity": granularity,
             "head_dim": site.head_dim, "activation_bits": bits.pop() if bits else None,
             "online_hadamard": hadamard, "qkv_bias": site.q_proj.bias is not None,
             "o_bias": site.o_proj.bias is not None, "mlp_bias": any(k.endswith("mlp.down_proj.bias") for k in tensors),
             "layers": layers}
    return tensors, block


def _read_site(gm: GraphModule, site: AttentionSite, granularity: str, tensors: dict, quant: dict) -> dict:
    """Put one layer's factors and o_proj into ``tensors``; returns its ranks and latent widths."""
    attn = _name(site.module_path)
    projections = {"q": (site.q_proj, site.n_heads), "k": (site.k_proj, site.n_kv_heads),
                   "v": (site.v_proj, site.n_kv_heads)}
    layer = {}
    for p, (proj, heads) in projections.items():
        if not proj.factored or proj.up is None:
            raise WsvdError(f"layer {site.layer} {p}_proj is not factored: wsvd export vllm serves factored recipes")
        spec = factor_spec(proj.node)
        if spec.granularity != granularity:
            raise WsvdError(f"layer {site.layer} mixes {spec.granularity} and {granularity} factors: the vLLM plugin "
                            "serves one granularity per model")
        down = "qkv" if granularity == "joint" else p
        tensors[f"{attn}.{down}_down.weight"] = _get(gm, proj.latent.args[1])
        up = _get(gm, proj.node.args[1])
        if spec.per_head:
            up = head_blocks(up, heads).flatten(0, 1)
        tensors[f"{attn}.{p}_up.weight"] = up
        if proj.bias is not None:
            tensors[f"{attn}.{p}_up.bias"] = _get(gm, proj.node.args[2])
        _record_quant(quant, f"{attn}.{down}_down", proj.latent, None)
        _record_quant(quant, f"{attn}.{p}_up", proj.node, spec.width if spec.per_head and heads > 1 else None)
        layer[p] = {"ranks": list(spec.ranks), "width": spec.width}
    return layer


def _record_quant(quant: dict, name: str, linear: Node, group: int | None) -> None:
    """Bits of the activation quantiser in front of ``linear`` (None: none), checked to quantise per token
    (per token per head of width ``group`` for per-head up-projections), as the plugin does."""
    x = linear.args[0]
    if not is_call(x, fake_quant_activation):
        quant[name] = None
        return
    got = x.kwargs.get("group")
    if x.kwargs.get("clip") is not None:
        raise WsvdError(f"{name} clips its input's range (--bits ...c{x.kwargs['clip']:g}), the vLLM plugin does not: "
                        "export an artifact compressed without activation clipping")
    if got != group:
        raise WsvdError(f"{name} quantises its input in groups of {got}, the vLLM plugin in groups of {group}: "
                        "export a recipe from wsvd_passes.compression.recipes")
    quant[name] = x.args[1]


def _put_linear(gm: GraphModule, node: Node, path: str, tensors: dict) -> None:
    tensors[f"{path}.weight"] = _get(gm, node.args[1])
    if len(node.args) > 2 and node.args[2] is not None:
        tensors[f"{path}.bias"] = _get(gm, node.args[2])


def _get(gm: GraphModule, node: Node | str) -> torch.Tensor:
    return tensor_attr(gm, node if isinstance(node, str) else node.target).detach()


def _name(path: str) -> str:
    """The Hugging Face name of a captured module path (``model.model.layers.0`` -> ``model.layers.0``)."""
    return path.removeprefix(_CAPTURE_PREFIX)
