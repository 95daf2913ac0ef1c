"""Compressed-model artifacts: a self-describing directory, reloaded by replaying the passes.

``save`` writes ``DIR/``:

- ``manifest.json``: format and library/torch versions, the model (registry name or
  checkpoint path) and a fingerprint of its weights, the recipe with every option, bits,
  target and achieved rho1/rho2, per-layer ranks, reconstruction errors, fine-tuning/QAT
  losses, calibration provenance (data source and sha256, windows, gradient samples);
- ``weights.safetensors``: every tensor of the compressed graph that differs from the
  uncompressed capture (factors, rank buffers, rotated and quantised weights), packed
  (:mod:`wsvd_passes.artifacts.packing`): quantised weights as int8 / int4-in-int32 codes with per-row
  scales in compressed-tensors' layouts, other weights in ``save_dtype`` (bfloat16 by default),
  tensors that are equal (tied embedding / LM head) once; the manifest's ``storage`` says how;
- ``spectra.safetensors``: singular values before/after per group (for ``wsvd report``);
- ``model.pt2`` (only with ``save_pt2=True``): the exported program (``torch.export.save``),
  for users of torch.export; :func:`load` does not read it.

Saving rounds the compressed graph's stored weights to ``save_dtype`` in place, so the
in-memory graph that is evaluated afterwards is exactly the artifact that is deployed.

:func:`load` never unpickles: it loads the base model, captures it, replays the recipe's
passes in structure-only mode (:func:`~wsvd_passes.compression.compress.recipe_passes` with
``replay=True``, on placeholder factors of the recorded ranks) and then puts the saved
tensors in place, so the graph and every tensor equal the saved ones (identical logits).
The same replay works on the decode graph, for generation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..algorithms.lowrank import PROJECTIONS
from ..algorithms.quantize import Bits, parse_bits
from ..compression.compress import FactorReport, recipe_passes
from ..compression.recipes import Recipe
from ..errors import WsvdError
from ..graph.capture import CapturedGraph, capture_decode, capture_forward
from ..graph.pipeline import Pipeline
from ..graph.quant_spec import quantized_weights
from ..graph.sites import AttentionSite, find_sites
from ..models.registry import LoadedModel, load_model
from ..passes.factorize import LayerFactors, pad_heads
from ..passes.qat import QATTarget
from .packing import merge_layouts, pack, tensor_digest, unpack

FORMAT = "wsvd-artifact"
FORMAT_VERSION = 4  # 4: the online Hadamard is stored as its factors (rotate.OnlineHadamard); 3: a rotated tied LM
# head reads the rotated embedding (rotate.TIED_GAMMA); 2: packed weights (manifest["storage"]); 1: float tensors
FIRST_ROTATION_FORMAT = 4  # rotating recipes written before this version replay into a different graph


def library_version() -> str:
    try:
        return version("wsvd-passes")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def fingerprint(captured: CapturedGraph) -> str:
    """sha256 over the names and bytes of every parameter and buffer of an uncompressed capture."""
    digest = hashlib.sha256()
    for name, tensor in sorted(captured.gm.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy())  # the buffer, not a bytes copy
    return digest.hexdigest()


def digests(gm: torch.fx.GraphModule) -> dict[str, str]:
    """:func:`~wsvd_passes.artifacts.packing.tensor_digest` of every parameter and buffer of ``gm``, by name."""
    return {name: tensor_digest(t) for name, t in gm.state_dict().items()}


@dataclasses.dataclass(frozen=True)
class Dense:
    """What :func:`save` reads of the uncompressed capture, taken before compressing it: the capture can then be
    compressed in place, its dense tensors freed as the passes replace them."""

    kind: str  # the graph: "forward" or "decode"
    fingerprint: str  # :func:`fingerprint`
    digests: dict[str, str]  # :func:`digests`: what the artifact's change set is taken against
    heads: dict  # n_heads, n_kv_heads, head_dim, hidden_size


def dense(captured: CapturedGraph) -> Dense:
    """The :class:`Dense` record of an uncompressed capture."""
    site = find_sites(captured.gm)[0]
    heads = {"n_heads": site.n_heads, "n_kv_heads": site.n_kv_heads, "head_dim": site.head_dim,
             "hidden_size": site.hidden_size}
    return Dense(captured.kind, fingerprint(captured), digests(captured.gm), heads)


@dataclasses.dataclass
class Artifact:
    """A reloaded compressed model: the base model, the compressed capture and the manifest."""

    model: LoadedModel
    captured: CapturedGraph
    manifest: dict


def save(directory: str | Path, *, model: str, base: Dense, compressed: CapturedGraph, recipe: Recipe,
         bits: Bits, rho1_target: float | None, report: FactorReport | None, calibration: dict,
         environment: dict, save_dtype: torch.dtype = torch.bfloat16, save_pt2: bool = False) -> dict:
    """Write the artifact of ``compressed`` (made from the uncompressed capture recorded in ``base``, :func:`dense`);
    returns the manifest.

    The compressed graph's floating weights that are stored in ``save_dtype`` are rounded to it
    in place (see the module docstring).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stored, storage = packed_changes(base.digests, compressed.gm, save_dtype)
    state = compressed.gm.state_dict()
    with torch.no_grad():
        for name in storage["cast"]:
            state[name].copy_(state[name].to(save_dtype))
    save_file(stored, out / "weights.safetensors", metadata={"format": FORMAT})
    if report is not None:
        save_file({k: v.contiguous() for k, v in report.spectra.items()}, out / "spectra.safetensors")
    exported = "not saved (pass save_pt2=True / --save-pt2)"
    if save_pt2:
        try:
            torch.export.save(compressed.reexport(), out / "model.pt2")
            exported = "model.pt2"
        except Exception as e:  # noqa: BLE001 - optional output; the reason is recorded instead
            exported = f"not saved ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "wsvd_version": library_version(),
        "model": model, "model_sha256": base.fingerprint, "graph": base.kind,
        "recipe": dataclasses.asdict(recipe), "bits": bits.name, "rho1_target": rho1_target,
        **(report.as_dict() if report is not None else {"rho1": 1.0, "rho2": 1.0}),
        "heads": base.heads,
        "calibration": calibration, "environment": environment, "exported_program": exported,
        "tensors": len(stored), "storage": storage,
        "bytes": (out / "weights.safetensors").stat().st_size,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def packed_changes(reference: dict[str, str], gm: torch.fx.GraphModule, dtype: torch.dtype
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """What an artifact stores of the compressed ``gm``: its tensors that are not in the uncompressed capture or
    differ from it (``reference``: the capture's :func:`digests`), packed (:func:`~wsvd_passes.artifacts.packing.pack`):
    (stored, layout)."""
    state = gm.state_dict()
    changed = {name: t.detach() for name, t in state.items() if reference.get(name) != tensor_digest(t)}
    parameters = {name for name, _ in gm.named_parameters()}
    return pack(changed, quantized_weights(gm), state, parameters, dtype)


def read_manifest(directory: str | Path) -> dict:
    """The manifest of an artifact directory, checked for format and version."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise WsvdError(f"{directory} has no manifest.json: give a directory written by `wsvd compress --out`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WsvdError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): write the artifact again with "
                        "`wsvd compress --out`") from None
    except UnicodeDecodeError:
        raise WsvdError(f"{path} is not UTF-8 text: write the artifact again with `wsvd compress --out`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise WsvdError(f"{path} is not a wsvd artifact manifest (format {found!r}): give a directory written by "
                        "`wsvd compress --out`")
    got = manifest.get("format_version")
    if not isinstance(got, int) or isinstance(got, bool) or got > FORMAT_VERSION:
        raise WsvdError(f"{path} has artifact format version {got!r} (written by wsvd-passes "
                        f"{manifest.get('wsvd_version')}); this wsvd-passes {library_version()} reads up to "
                        f"{FORMAT_VERSION}: upgrade wsvd-passes or compress again")
    if got < FIRST_ROTATION_FORMAT and manifest.get("recipe", {}).get("rotate"):
        raise WsvdError(f"{path} is a rotated model in artifact format {got}, from before the online Hadamard was "
                        f"stored as its factors (format {FIRST_ROTATION_FORMAT}): compress it again")
    return manifest


def load(directory: str | Path, *, decode: bool = False, max_cache_len: int = 256, batch_size: int = 1,
         model: str | LoadedModel | None = None) -> Artifact:
    """Rebuild the compressed model of ``directory`` (full-sequence graph, or the decode graph).

    ``model`` overrides the recorded model name or path (e.g. a checkpoint that moved), or
    passes it already loaded; its weights must still match the recorded fingerprint.
    """
    manifest = read_manifest(directory)
    weights_path = Path(directory) / "weights.safetensors"
    if not weights_path.is_file():
        raise WsvdError(f"{directory} has no weights.safetensors: the artifact is incomplete, compress again")
    weights = read_weights(directory, manifest)  # a damaged file fails here, before the model is captured
    lm = model if isinstance(model, LoadedModel) else load_model(model or manifest["model"])
    captured = capture_forward(lm.model)
    if fingerprint(captured) != manifest.get("model_sha256"):
        raise WsvdError(f"the weights of {lm.name} are not the ones {directory} was compressed "
                        "from: pass the original checkpoint with --model")
    if decode:
        captured = capture_decode(lm.model, batch_size=batch_size, max_cache_len=max_cache_len)
    recipe, bits = _recipe(manifest), parse_bits(manifest["bits"])
    sites = find_sites(captured.gm)
    plan = placeholder_plan(sites, manifest, recipe.granularity) if recipe.factor else None
    targets = placeholder_targets(sites) if recipe.qat else None
    base_names = set(captured.gm.state_dict())
    Pipeline(recipe_passes(recipe, bits, plan, targets, replay=True))(captured)
    _put_tensors(captured, weights, base_names, directory)
    return Artifact(lm, captured, manifest)


def read_weights(directory: str | Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The graph tensors of an artifact, unpacked (format 2) or as stored (format 1)."""
    path = Path(directory) / "weights.safetensors"
    try:
        stored = load_file(path)
    except (SafetensorError, OSError) as e:
        raise WsvdError(f"{path} cannot be read ({e}): the file is truncated or damaged, compress again") from None
    if manifest["format_version"] < 2:
        return stored
    if "storage" not in manifest:
        raise WsvdError(f"{Path(directory) / 'manifest.json'} has no 'storage' section: compress again")
    return unpack(stored, manifest["storage"], str(path))


def _recipe(manifest: dict) -> Recipe:
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = set(manifest["recipe"]) - fields
    if unknown:
        raise WsvdError(f"the artifact's recipe has options this version does not know ({', '.join(sorted(unknown))}): "
                        "upgrade wsvd-passes")
    return Recipe(**manifest["recipe"])


def placeholder_plan(sites: list[AttentionSite], manifest: dict, granularity: str) -> dict[int, LayerFactors]:
    """Seeded random factors with the recorded ranks and the layout of ``granularity``.

    Only their shapes and sparsity (block-diagonal up-projections for per-head factors) matter:
    the saved tensors replace them.
    """
    g = torch.Generator().manual_seed(0)
    plan = {}
    for site in sites:
        ranks = manifest["ranks"][str(site.layer)]
        outs = {"q": site.n_heads * site.head_dim, "k": site.n_kv_heads * site.head_dim,
                "v": site.n_kv_heads * site.head_dim}
        E = site.hidden_size
        if granularity == "joint":
            (r,) = ranks["qkv"]
            plan[site.layer] = LayerFactors("joint", {"qkv": torch.randn(r, E, generator=g)},
                                            {p: torch.randn(outs[p], r, generator=g) for p in PROJECTIONS},
                                            {p: "qkv" for p in PROJECTIONS}, {p: [r] for p in PROJECTIONS})
            continue
        downs, ups = {}, {}
        for p in PROJECTIONS:
            d = site.head_dim if granularity == "head" else outs[p]
            heads = ranks[p]
            downs[p], ups[p] = pad_heads([torch.randn(d, r, generator=g) for r in heads],
                                         [torch.randn(r, E, generator=g) for r in heads])
        plan[site.layer] = LayerFactors(granularity, downs, ups, {p: p for p in PROJECTIONS},
                                        {p: list(ranks[p]) for p in PROJECTIONS})
    return plan


def placeholder_targets(sites: list[AttentionSite]) -> dict[tuple[int, str], QATTarget]:
    """Zero QAT targets of the right shapes (replay takes no QAT steps)."""
    out = {}
    for site in sites:
        for p, heads in (("q", site.n_heads), ("k", site.n_kv_heads), ("v", site.n_kv_heads)):
            shape = (heads * site.head_dim, site.hidden_size)
            out[(site.layer, p)] = QATTarget(torch.zeros(shape), torch.ones(shape))
    return out


def _put_tensors(captured: CapturedGraph, tensors: dict[str, torch.Tensor], base_names: set[str], directory) -> None:
    """Replace the replayed graph's tensors by the saved ones (new objects: the capture shares storage)."""
    state = captured.gm.state_dict()
    unknown = sorted(set(tensors) - set(state))
    unfilled = sorted(set(state) - base_names - set(tensors))
    if unknown or unfilled:
        name = (unknown or unfilled)[0]
        raise WsvdError(f"{directory}: tensor {name!r} is {'saved but not in' if unknown else 'not saved for'} the "
                        "replayed graph; the artifact does not match this model or wsvd-passes version: compress again")
    for name, value in tensors.items():
        if value.shape != state[name].shape:
            raise WsvdError(f"{directory}: saved tensor {name!r} is {tuple(value.shape)}, the replayed graph expects "
                            f"{tuple(state[name].shape)}: compress again")
        owner_path, _, leaf = name.rpartition(".")
        owner = captured.gm.get_submodule(owner_path)
        value = value.to(state[name].device, state[name].dtype)
        if leaf in owner._parameters:
            owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=value.is_floating_point()))
        else:
            owner.register_buffer(leaf, value)


def write_shard(directory: str | Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write ``DIR/name.safetensors`` under a temporary name and rename it: a kill leaves no half-written shard."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    final, staging = out / f"{name}.safetensors", out / f".{name}.safetensors.tmp"
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, staging,
                  metadata={"format": FORMAT, **(metadata or {})})
    except OSError as e:
        staging.unlink(missing_ok=True)
        raise WsvdError(f"cannot write {final} ({e.strerror}): free disk space or choose another --out") from None
    staging.replace(final)
    return final


def save_streamed(directory: str | Path, *, model: str, model_sha256: str, shards: list[Path], heads: dict,
                  recipe: Recipe, bits: Bits, rho1_target: float | None, report: FactorReport, calibration: dict,
                  environment: dict) -> dict:
    """The artifact of a streamed compression (:mod:`wsvd_passes.compression.stream`): its shards (each packed by
    :func:`packed_changes` with its layout in the shard's metadata) concatenated into ``weights.safetensors``
    (then removed) one tensor at a time, the spectra and the manifest, as :func:`save` writes them."""
    out = Path(directory)
    storage = merge_layouts([json.loads(shard_metadata(shard)["storage"]) for shard in shards])
    packed = {f"{name}.{suffix}" for name in storage["quantized"]
              for suffix in ("weight", "weight_packed", "weight_shape", "weight_scale")}
    # packed codes and scales keep their own names; graph tensors stored as they are may be shared
    stored, aliases = concatenate_safetensors(shards, out / "weights.safetensors", {"format": FORMAT}, packed)
    # a shard's alias may name a tensor that the concatenation dropped as a copy: point it at the one written
    storage["aliases"] = {name: aliases.get(target, target) for name, target in storage["aliases"].items()} | aliases
    write_shard(out, "spectra", {k: v.contiguous() for k, v in report.spectra.items()})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "wsvd_version": library_version(),
        "model": model, "model_sha256": model_sha256, "graph": "forward",
        "recipe": dataclasses.asdict(recipe), "bits": bits.name, "rho1_target": rho1_target,
        **report.as_dict(),
        "heads": heads, "calibration": calibration, "environment": environment,
        "exported_program": "not saved (--stream)",
        "tensors": stored, "storage": storage, "bytes": (out / "weights.safetensors").stat().st_size,
        "streamed": True,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for shard in shards:
        shard.unlink()
    return manifest


def concatenate_safetensors(shards: list[Path], final: Path, metadata: dict, unshared: set[str]
                            ) -> tuple[int, dict[str, str]]:
    """Write the tensors of ``shards`` (disjoint names) as one safetensors file ``final``, copying their bytes one
    tensor at a time; a tensor not named in ``unshared`` whose bytes, dtype and shape equal an earlier one's is not
    written again (every layer's online Hadamard). Returns the number of tensors written and the aliases
    (name -> the written name with the same content).

    By hand because safetensors can only save a dict held in memory: the merged file of a model larger than
    memory could not be written. Its format: an 8-byte little-endian header length, a JSON header (dtype, shape
    and [begin, end) byte offsets per tensor, ``__metadata__``), the data.
    """
    header, copies, aliases, seen, offset = {"__metadata__": metadata}, [], {}, {}, 0
    for shard in shards:
        with open(shard, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            entries = json.loads(f.read(length))
            for name, info in entries.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if name not in unshared:
                    f.seek(8 + length + begin)
                    key = hashlib.sha256(f"{info['dtype']}{info['shape']}".encode() + f.read(end - begin)).hexdigest()
                    if key in seen:
                        aliases[name] = seen[key]
                        continue
                    seen[key] = name
                header[name] = {"dtype": info["dtype"], "shape": info["shape"],
                                "data_offsets": [offset, offset + end - begin]}
                copies.append((shard, 8 + length + begin, end - begin))
                offset += end - begin
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    staging = final.with_name(f".{final.name}.tmp")
    try:
        with open(staging, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little") + encoded)
            for shard, start, size in copies:
                with open(shard, "rb") as f:
                    f.seek(start)
                    out.write(f.read(size))
    except OSError as e:
        staging.unlink(missing_ok=True)
        raise WsvdError(f"cannot write {final} ({e.strerror}): free disk space or choose another --out") from None
    staging.replace(final)
    return len(header) - 1, aliases


def shard_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()
