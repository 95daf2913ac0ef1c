"""Where a low-bit artifact's activation error comes from (issue 15), measured on calibration windows only.

    python examples/lowbit_breakdown.py ARTIFACT [--windows 8] [--json breakdown.json] [--try w4a4c0.9+down_proj ...]

ARTIFACT is a ``wsvd compress --bits w4a4`` (or w8a4, ...) directory. Every activation quantiser of the reloaded graph
(a ``fake_quant_activation`` node, named by the :func:`~wsvd_passes.graph.quant_spec.input_role` that FakeQuantize
recorded on the linear it feeds: ``layer3.down_proj``; a layer's q/k/v quantisers share ``qkv``) gets

- ``rel_error`` = ||Q(x) - x|| / ||x|| over all tokens of the windows, every quantiser active (x is what the
  deployed graph feeds it), and the same for each clip ratio c of CLIPS (Q_c: per-token range c * max|x|), with
  ``best_clip`` the c of least error;

and KL(dense || compressed), top-1 and ppl on the same windows are measured for the artifact's bit setting B and for
B+KIND (each kind of input of every layer at 8 bits), B+layerN (each layer), BcC (each c of CLIPS) and the ``--try``
settings: each row sets every quantiser of the reloaded graph to what ``wsvd compress --bits ROW`` deploys
(:func:`~wsvd_passes.passes.fake_quant.activation_quantiser`; weights and factors are those of the artifact, which the
activation options do not change). The evaluation half is never read.
"""

import argparse
import dataclasses
import json
import time

import torch
from torch.fx import Interpreter

from wsvd_passes.algorithms.quantize import ACTIVATION_KINDS, EXCEPTION_BITS, fake_quant_activation, parse_bits
from wsvd_passes.artifacts import artifact
from wsvd_passes.eval.data import pydoc_text, token_windows
from wsvd_passes.eval.evaluation import MemoLogits, evaluate
from wsvd_passes.graph.capture import capture_forward
from wsvd_passes.graph.quant_spec import quant_spec
from wsvd_passes.graph.sites import find_sites
from wsvd_passes.passes.fake_quant import activation_quantiser, resolve_exceptions

CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantisers(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Each activation quantiser of the decoder layers -> the role of the linear it feeds (``layer3.down_proj``)."""
    out = {}
    for node in gm.graph.nodes:
        if node.target is fake_quant_activation:
            (user,) = node.users
            if quant_spec(user).role is not None:  # an e8 LM head's input stays as it is
                out[node] = quant_spec(user).role
    return out


class ErrorProbe(Interpreter):
    """Runs the graph and sums, per quantiser role, ||x||^2 and ||Q_c(x) - x||^2 for every c of CLIPS."""

    def __init__(self, gm, roles):
        super().__init__(gm)
        self.roles = roles
        self.sums = {r: torch.zeros(len(CLIPS) + 1, dtype=torch.float64) for r in set(roles.values())}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.roles:
            x = self.env[n.args[0]].double()
            kw = {k: v for k, v in n.kwargs.items() if k != "clip"}
            row = [x.square().sum()] + [(fake_quant_activation(x, n.args[1], clip=c, **kw) - x).square().sum()
                                        for c in CLIPS]
            self.sums[self.roles[n]] += torch.stack(row)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 256 tokens (default 8)")
    parser.add_argument("--json", help="also write the breakdown here")
    parser.add_argument("--try", dest="settings", nargs="*", default=[], help="further --bits settings to score")
    args = parser.parse_args()
    start = time.time()
    art = artifact.load(args.artifact)
    gm = art.captured.gm
    dense = capture_forward(art.model.model)
    windows = token_windows(art.model.tokenizer, pydoc_text("calibration"), 256, max_windows=args.windows)
    reference = MemoLogits(lambda ids: dense.gm(input_ids=ids))
    roles = quantisers(gm)
    low = sum(n.args[1] < EXCEPTION_BITS for n in roles)
    print(f"{args.artifact}: bits {art.manifest['bits']}, {len(roles)} activation quantisers ({low} below "
          f"{EXCEPTION_BITS} bits), {len(windows)} calibration windows")

    probe = ErrorProbe(gm, roles)
    with torch.no_grad():
        for w in windows.split(4):
            probe.run(w)
    errors = {}
    for role, s in sorted(probe.sums.items(), key=lambda kv: (int(kv[0].split(".")[0][5:]), kv[0])):
        rel = (s[1:] / s[0]).sqrt().tolist()
        best = min(range(len(CLIPS)), key=rel.__getitem__)
        errors[role] = {"rel_error": rel[0], "best_clip": CLIPS[best], "best_rel_error": rel[best],
                        "rel_error_by_clip": dict(zip(map(str, CLIPS), rel))}
    print("role                  rel_error  best_clip  rel_error@best")
    for role, e in errors.items():
        print(f"{role:21s} {e['rel_error']:9.4f}  {e['best_clip']:9.2f}  {e['best_rel_error']:14.4f}")

    sites = find_sites(gm)

    def kl(setting: str) -> dict:
        """KL, top-1 and ppl with every quantiser as ``--bits setting`` deploys it (then restored)."""
        bits = parse_bits(setting)
        if (bits.weight, bits.activation) != (base.weight, base.activation):
            raise SystemExit(f"error: --try {setting}: the artifact is {base.name}; try its activation options only")
        exceptions = resolve_exceptions(bits, sites)
        saved = {n: (n.args, dict(n.kwargs)) for n in roles}
        for n, role in roles.items():
            b, clip = activation_quantiser(bits, role, exceptions)
            n.args = (n.args[0], b)
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "clip"} | ({"clip": clip} if clip else {})
        gm.recompile()
        try:
            r = evaluate(lambda ids: gm(input_ids=ids), windows, reference=reference, batch_size=2, progress=False)
        finally:
            for n, (a, k) in saved.items():
                n.args, n.kwargs = a, k
            gm.recompile()
        print(f"{setting:40s} {r.kl:7.4f} {r.top1:7.4f} {r.ppl:8.3f}", flush=True)
        return {"kl": r.kl, "top1": r.top1, "ppl": r.ppl}

    base = parse_bits(art.manifest["bits"])
    plain = dataclasses.replace(base, activation_clip=None, a8=()).name
    kinds = {r.split(".")[1] for r in roles.values()}
    layers = sorted({int(r.split(".")[0][5:]) for r in roles.values()})
    settings = ([plain] + [f"{plain}+{k}" for k in ACTIVATION_KINDS if k in kinds] + [f"{plain}c{c:g}" for c in CLIPS[1:]]
                + args.settings + [f"{plain}+layer{i}" for i in layers])
    print("setting (--bits)                           KL      top-1   ppl")
    rows = {}
    for setting in settings:  # the JSON is rewritten after each row (the per-layer rows come last and take longest)
        rows[setting] = kl(setting)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"artifact": args.artifact, "bits": art.manifest["bits"], "calibration_windows": len(windows),
                           "clips": CLIPS, "errors": errors, "kl": rows, "seconds": time.time() - start}, f, indent=2)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
