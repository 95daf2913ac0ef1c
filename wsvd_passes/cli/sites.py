"""``wsvd sites``: the attention sites found in the captured graph."""

from __future__ import annotations

from .common import add_model


def add_parser(sub) -> None:
    si = sub.add_parser("sites", help="list the attention sites found in the captured graph")
    add_model(si)
    si.set_defaults(run=cmd_sites)


def cmd_sites(args) -> dict:
    from ..graph.capture import capture_forward
    from ..graph.sites import find_sites
    from ..models.registry import load_model

    lm = load_model(args.model)
    sites = find_sites(capture_forward(lm.model).gm)
    print(f"{'layer':>5}  {'module':<40}{'heads':>6}{'kv':>4}{'dim':>5}{'hidden':>7}  q/k/v bias")
    rows = []
    for s in sites:
        bias = s.q_proj.bias is not None
        print(f"{s.layer:>5}  {s.module_path[-40:]:<40}{s.n_heads:>6}{s.n_kv_heads:>4}{s.head_dim:>5}{s.hidden_size:>7}  {bias}")
        rows.append({"layer": s.layer, "module": s.module_path, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads,
                     "head_dim": s.head_dim, "hidden_size": s.hidden_size, "bias": bias})
    return {"model": lm.name, "sites": rows}
