"""The factorisation pass: replace each layer's q/k/v linears by low-rank factors.

Given per-layer :class:`LayerFactors`, the graph of one attention layer becomes

    joint       C = x D^T (one shared latent);  q = C U_q^T + b_q,  k = C U_k^T + b_k,  v = C U_v^T + b_v
    projection  C_p = x D_p^T;                  p = C_p U_p^T + b_p          for p in q, k, v
    head        C_p = x D_p^T  (all heads of p in one matmul, D_p = [D_p,0; ...; D_p,n-1]);
                p = C_p U_p^T + b_p with U_p block diagonal (head h: [H, r_max])

Per-head ranks are padded to the projection's largest rank with zero rows of D and
zero columns of U (exact). Everything stays ``aten.linear``, which export keeps as
one op, so the factored graph re-exports and :func:`~wsvd_passes.graph.sites.find_sites`
recognises ``linear(linear(x, D), U)`` as a factored projection. New tensors live
under ``<attention module>.wsvd``: ``{name}_down``, ``{p}_up``, int64 ``{p}_ranks`` (rank per
head; one entry for the other granularities); the layout record every later pass reads is the
:class:`~wsvd_passes.graph.factor_spec.FactorSpec` in each new up-projection node's meta.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule

from ..algorithms.lowrank import PROJECTIONS
from ..errors import WsvdError
from ..graph.factor_spec import FACTOR_META, FactorSpec, from_head_blocks, pad_rank, ranks_target
from ..graph.graph_utils import add_tensor_attr, copy_meta, get_attr_node, infer_val, remove_attr_if_unused
from ..graph.pipeline import GraphPass
from ..graph.sites import AttentionSite

aten = torch.ops.aten


@dataclasses.dataclass
class LayerFactors:
    """Factors of one layer. ``downs`` maps a latent name ("qkv" or "q"/"k"/"v") to D [r, E];
    ``ups`` maps each projection to U [out, r of its latent]; ``latent_of`` maps projection -> latent."""

    granularity: str
    downs: dict[str, torch.Tensor]
    ups: dict[str, torch.Tensor]
    latent_of: dict[str, str]
    ranks: dict[str, list[int]]  # per projection: rank per head (head) or [rank] (other granularities)


def block_diagonal(U: torch.Tensor, n: int) -> bool:
    """True when U [n H, n r] has n diagonal blocks and zeros elsewhere (per-head factors)."""
    rows, cols = U.shape[0] // n, U.shape[1] // n
    mask = torch.block_diag(*[torch.ones(rows, cols, dtype=torch.bool, device=U.device)] * n)
    return U.shape == mask.shape and not bool(U.detach()[~mask].any())


def pad_heads(ups: list[torch.Tensor], downs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-head factors (up_h [H, r_h], down_h [r_h, E]) into D [n r_max, E] and block-diagonal U."""
    r_max = max(max(d.shape[0] for d in downs), 1)
    padded_ups, padded_downs = zip(*(pad_rank(u, d, r_max) for u, d in zip(ups, downs)))
    return torch.cat(padded_downs), from_head_blocks(torch.stack(padded_ups))


class FactorizeQKV(GraphPass):
    """Rewrite q/k/v projections into the factors of ``plan`` (layer index -> LayerFactors)."""

    def __init__(self, plan: dict[int, LayerFactors]):
        self.plan = plan

    def transform(self, gm: GraphModule, sites: list[AttentionSite]) -> bool:
        if set(self.plan) - {s.layer for s in sites}:
            raise WsvdError(f"the plan names layers {sorted(set(self.plan) - {s.layer for s in sites})} the graph does not have")
        for site in sites:
            if site.layer in self.plan:
                self._factor_site(gm, site, self.plan[site.layer])
        return bool(self.plan)

    def _factor_site(self, gm: GraphModule, site: AttentionSite, f: LayerFactors) -> None:
        projections = {"q": site.q_proj, "k": site.k_proj, "v": site.v_proj}
        if any(p.factored for p in projections.values()):
            raise WsvdError(f"layer {site.layer} is already factored; factor a fresh capture")
        owner = projections["q"].weight.rpartition(".")[0].rpartition(".")[0] + ".wsvd"
        weight = gm.get_parameter(projections["q"].weight)
        device, dtype = weight.device, weight.dtype
        missing = [p for p in PROJECTIONS if p not in f.ups or f.latent_of.get(p) not in f.downs]
        if missing:
            raise WsvdError(f"layer {site.layer}: the plan has no factors for {', '.join(missing)}")
        for name, proj in projections.items():
            expected = (proj.out_features, f.downs[f.latent_of[name]].shape[0])
            if tuple(f.ups[name].shape) != expected:
                raise WsvdError(f"layer {site.layer} {name}: up-projection is {tuple(f.ups[name].shape)}, expected {expected}")
        for name, proj in projections.items():
            limit = min(site.head_dim if f.granularity == "head" else proj.out_features, site.hidden_size)
            if f.granularity == "joint":
                limit = min(sum(p.out_features for p in projections.values()), site.hidden_size)
            too_big = [r for r in f.ranks[name] if not 0 <= r <= limit]
            if too_big:
                raise WsvdError(f"layer {site.layer} {name}: rank {too_big[0]} is outside [0, {limit}] (a "
                                f"{f.granularity} factor cannot exceed {'the head dim' if f.granularity == 'head' else 'its matrix'}"
                                f"): use ranks <= {limit}")
        first = min((p.node for p in projections.values()), key=lambda n: list(gm.graph.nodes).index(n))
        latents = {}
        for latent_name, down in f.downs.items():
            if down.shape[1] != site.hidden_size:
                raise WsvdError(f"layer {site.layer}: down-projection {latent_name} takes {down.shape[1]} inputs, not {site.hidden_size}")
            add_tensor_attr(gm, f"{owner}.{latent_name}_down", down.to(device, dtype).contiguous(), parameter=True)
            d_node = get_attr_node(gm, f"{owner}.{latent_name}_down", first)
            with gm.graph.inserting_before(first):
                latents[latent_name] = infer_val(gm, copy_meta(
                    gm.graph.call_function(aten.linear.default, (site.qkv_input, d_node)), first))
        for name, proj in projections.items():
            add_tensor_attr(gm, f"{owner}.{name}_up", f.ups[name].to(device, dtype).contiguous(), parameter=True)
            add_tensor_attr(gm, ranks_target(f"{owner}.{name}_up"),
                            torch.tensor(f.ranks[name], dtype=torch.long, device=device), parameter=False)
            u_node = get_attr_node(gm, f"{owner}.{name}_up", proj.node)
            args = (latents[f.latent_of[name]], u_node) + ((proj.node.args[2],) if len(proj.node.args) > 2 else ())
            with gm.graph.inserting_before(proj.node):
                new = infer_val(gm, copy_meta(gm.graph.call_function(aten.linear.default, args), proj.node))
            width = f.downs[f.latent_of[name]].shape[0]
            blocks = len(f.ranks[name]) if f.granularity == "head" else 1
            new.meta[FACTOR_META] = FactorSpec(f.granularity, blocks, tuple(f.ranks[name]), width // blocks)
            proj.node.replace_all_uses_with(new)
            gm.graph.erase_node(proj.node)
            remove_attr_if_unused(gm, proj.weight)
