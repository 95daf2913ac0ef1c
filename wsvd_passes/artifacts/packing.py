"""Packed storage of a compressed graph's tensors, in compressed-tensors' layouts.

A quantised weight (a linear with a :class:`~wsvd_passes.graph.quant_spec.QuantSpec`) holds
``codes * scale`` in the graph; it is stored as its integer codes and float32 per-row scales,
under the tensor's graph name ``T`` taken as the module name (compressed-tensors names, so
that its tools and vLLM's loader read the same layout):

    8 bits     ``T.weight`` int8 [out, in], ``T.weight_scale`` float32 [out, 1]  (int-quantized)
    2-7 bits   ``T.weight_packed`` int32 [out, ceil(in * bits / 32)], ``T.weight_shape`` int64 [2],
               ``T.weight_scale`` [out, 1]                                        (pack-quantized)

compressed-tensors' ``pack_to_int32`` / ``unpack_from_int32`` do the bit packing (4-bit codes:
eight per int32, offset by 8). The codes are exact: ``round(W / scale)`` with |codes| <= 2^(b-1) - 1,
so unpacking gives back the graph's values bit for bit. Other floating tensors are stored in
``dtype`` (bfloat16 by default); integer tensors and buffers (rank tables, fixed Hadamard
rotations) as they are. Equal tensors (a tied embedding / LM head, quantised or not) are stored
once; the layout maps every other name (and its scale) to the stored one.
"""

from __future__ import annotations

import hashlib

import torch

from ..errors import WsvdError
from ..graph.quant_spec import weight_codes

INT_QUANTIZED, PACK_QUANTIZED = "int-quantized", "pack-quantized"


def pack(tensors: dict[str, torch.Tensor], quantized: dict[str, tuple[int, str]], scales: dict[str, torch.Tensor],
         parameters: set[str], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored tensors and the layout that :func:`unpack` reads (a JSON-ready dict)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    stored, layout = {}, {"dtype": str(dtype).removeprefix("torch."), "quantized": {}, "aliases": {}, "cast": []}
    seen: dict[str, str] = {}
    scale_targets = {s for _, s in quantized.values()}
    for name, t in tensors.items():
        if name in quantized:
            bits, scale_target = quantized[name]
            scale = scales[scale_target].float()
            codes = weight_codes(t, scale, bits, name)
            key = f"{bits}:{tensor_digest(codes)}:{tensor_digest(scale)}"
            if key in seen:  # a tied LM head quantised like its embedding table
                first = seen[key]
                layout["aliases"].update({name: first, scale_target: quantized[first][1]})
                continue
            seen[key] = name
            if bits == 8:
                stored[f"{name}.weight"] = codes
                layout["quantized"][name] = {"bits": bits, "format": INT_QUANTIZED, "scale": scale_target}
            else:
                stored[f"{name}.weight_packed"] = pack_to_int32(codes, bits)
                stored[f"{name}.weight_shape"] = torch.tensor(codes.shape, dtype=torch.int64)
                layout["quantized"][name] = {"bits": bits, "format": PACK_QUANTIZED, "scale": scale_target}
            stored[f"{name}.weight_scale"] = scale[:, None].contiguous()
            continue
        if name in scale_targets:
            continue  # stored with its weight
        value = t.to(dtype) if name in parameters and t.is_floating_point() else t
        if value is not t:
            layout["cast"].append(name)
        key = tensor_digest(value)
        if key in seen:
            layout["aliases"][name] = seen[key]
            continue
        seen[key] = name
        stored[name] = value.contiguous()
    return stored, layout


def merge_layouts(layouts: list[dict]) -> dict:
    """One layout for the union of several :func:`pack` outputs over disjoint tensors (a streamed model's shards)."""
    dtypes = {layout["dtype"] for layout in layouts}
    if len(dtypes) > 1:
        raise WsvdError(f"the shards were packed in different dtypes ({', '.join(sorted(dtypes))}): compress again")
    merged = {"dtype": dtypes.pop(), "quantized": {}, "aliases": {}, "cast": []}
    for layout in layouts:
        merged["quantized"].update(layout["quantized"])
        merged["aliases"].update(layout["aliases"])
        merged["cast"] += layout["cast"]
    return merged


def unpack(stored: dict[str, torch.Tensor], layout: dict, where: str) -> dict[str, torch.Tensor]:
    """Every graph tensor back from :func:`pack`'s output (float32 codes * scale for quantised weights)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out = {}
    try:
        for name, info in layout["quantized"].items():
            bits, fmt = int(info["bits"]), info["format"]
            scale = _get(stored, f"{name}.weight_scale", where)
            if fmt == INT_QUANTIZED:
                codes = _get(stored, f"{name}.weight", where)
            elif fmt == PACK_QUANTIZED:
                shape = _get(stored, f"{name}.weight_shape", where).tolist()
                packed = _get(stored, f"{name}.weight_packed", where)
                if packed.dtype != torch.int32 or len(shape) != 2 or packed.shape[0] != shape[0] \
                        or packed.shape[1] != -(-shape[1] * bits // 32):
                    raise WsvdError(f"{where}: {name}.weight_packed {tuple(packed.shape)} does not hold a "
                                    f"{shape} weight at {bits} bits: the file is damaged, compress again")
                codes = unpack_from_int32(packed, bits, torch.Size(shape))
            else:
                raise WsvdError(f"{where}: {name} is stored as {fmt!r}, which this wsvd-passes does not read: upgrade")
            qmax = 2 ** (bits - 1) - 1
            if codes.dtype != torch.int8 or scale.shape != (codes.shape[0], 1) or not scale.is_floating_point() \
                    or int(codes.abs().max()) > qmax or not bool(torch.isfinite(scale).all() and (scale > 0).all()):
                raise WsvdError(f"{where}: quantised weight {name} has codes {tuple(codes.shape)} {codes.dtype} and "
                                f"scales {tuple(scale.shape)} that do not form a {bits}-bit weight: compress again")
            out[name] = codes.float() * scale.float()
            out[info["scale"]] = scale[:, 0].float()
        for name, value in stored.items():
            base = name.rpartition(".")[0]
            if base not in layout["quantized"]:
                out[name] = value
        for name, target in layout["aliases"].items():
            out[name] = _get(out, target, where)  # one tensor (passes replace tensors, never write into them)
    except (KeyError, TypeError, ValueError) as e:
        raise WsvdError(f"{where}: the packed layout is malformed ({type(e).__name__}: {e}): compress again") from None
    return out


def _get(stored: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in stored:
        raise WsvdError(f"{where}: tensor {name!r} is missing: the artifact is incomplete, compress again")
    return stored[name]


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: equal digests, equal tensors."""
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.detach().contiguous().cpu().view(torch.uint8).numpy())  # the buffer itself, not a bytes copy
    return digest.hexdigest()
