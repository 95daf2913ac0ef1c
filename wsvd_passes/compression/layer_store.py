"""Per-layer tensors of a streamed compression kept on disk between its passes (``--offload-dir``): each layer's
input activations, Gram statistics and Fisher, and the calibration that ``--resume`` reads back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..algorithms.lowrank import Group
from ..artifacts.artifact import shard_metadata, write_shard
from .calibration import InputStats, SiteStats


class LayerStore:
    """Per-layer tensors kept on disk between the passes: one safetensors file per (layer, what) in ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def put(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        write_shard(self.directory, name, tensors, metadata)

    def get(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.directory / f"{name}.safetensors")

    def put_hidden(self, layer: int, hidden: list[torch.Tensor]) -> None:
        """Layer ``layer``'s input h_i, one [1, S_n, E] tensor per sample."""
        self.put(f"input{layer:05d}", {str(n): h for n, h in enumerate(hidden)})

    def hidden(self, layer: int) -> list[torch.Tensor]:
        t = self.get(f"input{layer:05d}")
        return [t[str(n)] for n in range(len(t))]

    def put_positions(self, positions: list[torch.Tensor] | None) -> None:
        """The samples' multimodal-RoPE position ids [3, 1, S_n] (the same for every layer), when the model has them."""
        if positions is not None:
            self.put("positions", {str(n): p for n, p in enumerate(positions)})

    def layer_inputs(self, layer: int) -> list[dict[str, torch.Tensor]]:
        """Layer ``layer``'s graph inputs per sample: h_i (and position ids)."""
        path = self.directory / "positions.safetensors"
        positions = self.get("positions") if path.is_file() else None
        return graph_inputs(self.hidden(layer), [positions[str(n)] for n in range(len(positions))] if positions else None)

    def put_stats(self, layer: int, stats: SiteStats) -> None:
        self.put(f"stats{layer:05d}", {f"qkv.{f}": torch.as_tensor(getattr(stats.qkv, f)) for f in ("gram", "absmean", "tokens")})

    def stats(self, layer: int) -> SiteStats:
        t = self.get(f"stats{layer:05d}")
        return SiteStats(InputStats(t["qkv.gram"], t["qkv.absmean"], int(t["qkv.tokens"])))


@dataclasses.dataclass
class StreamedCalibration:
    """What rank allocation needs of every layer (sites, scores, groups without their matrices); the rest
    (statistics, Fisher) is in ``store``, read back one layer at a time."""

    heads: dict  # n_heads, n_kv_heads, head_dim, hidden_size (sites are found again in each layer's graph)
    layers: int
    groups: list[Group]  # all layers; weight/U/Vh on the meta device (shapes only), sigma kept
    scores: dict[tuple, torch.Tensor]
    samples: int
    store: LayerStore


def save_calibration(calib: StreamedCalibration) -> None:
    """Keep ``calib`` in its store (``calibration.safetensors``) for ``--resume``."""
    tensors = {f"sigma.{j}": g.sigma for j, g in enumerate(calib.groups)}
    tensors.update({f"score.{j}": calib.scores[g.key] for j, g in enumerate(calib.groups) if g.key in calib.scores})
    groups = [{"key": list(g.key), "shapes": [list(getattr(g, f).shape) for f in ("source", "U", "Vh")]}
              for g in calib.groups]
    calib.store.put("calibration", tensors, {"groups": json.dumps(groups), "heads": json.dumps(
        calib.heads), "layers": str(calib.layers), "samples": str(calib.samples)})


def load_calibration(store: LayerStore) -> StreamedCalibration | None:
    """The calibration :func:`save_calibration` kept in ``store``, or None."""
    path = store.directory / "calibration.safetensors"
    if not path.is_file():
        return None
    meta, tensors = shard_metadata(path), store.get("calibration")
    groups, scores = [], {}
    for j, g in enumerate(json.loads(meta["groups"])):
        source, U, Vh = (torch.empty(shape, device="meta") for shape in g["shapes"])
        groups.append(Group(layer=g["key"][0], name=g["key"][1], head=g["key"][2], source=source, scaling=None, U=U,
                            sigma=tensors[f"sigma.{j}"], Vh=Vh))
        if f"score.{j}" in tensors:
            scores[groups[-1].key] = tensors[f"score.{j}"]
    return StreamedCalibration(json.loads(meta["heads"]), int(meta["layers"]), groups, scores, int(meta["samples"]), store)


def graph_inputs(hidden: list[torch.Tensor], positions: list[torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:
    """A layer graph's kwargs per sample: ``hidden_states`` (and ``position_ids`` for multimodal RoPE)."""
    return [{"hidden_states": h, **({"position_ids": positions[n]} if positions else {})} for n, h in enumerate(hidden)]
