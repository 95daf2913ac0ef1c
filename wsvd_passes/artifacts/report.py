"""``wsvd report DIR``: a markdown report with PNG plots for a ``wsvd compress --out`` directory.

:func:`write_report` reads ``manifest.json`` (required), ``spectra.safetensors`` and
``evaluation.json`` (both optional) and writes ``report.md`` with four plots next to
it: per-layer, per-head ranks (heatmap), singular-value spectra before/after for the
first, middle and last layer, per-layer reconstruction error and per-layer rho1/rho2; with a
``wsvd table --json`` as ``evaluation.json``, a Pareto plot of KL against KV-cache bytes per token.
A section whose data the directory lacks becomes one line saying so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import WsvdError
from .artifact import read_manifest

_FIX = "point wsvd report at a directory written by wsvd compress --out"
_SPECTRUM_KEY = re.compile(r"layer(\d+)\.(\w+?)(?:\.head(\d+))?\.(before|after)")
_HEAD_KEYS = ("n_heads", "n_kv_heads", "head_dim", "hidden_size")
_EVAL_FIRST = ["recipe", "rho1", "rho1_achieved", "rho2_target", "rho2", "cache_bytes_per_token", "bits", "ppl", "nll",
               "kl", "top1", "ref_ppl", "tokens"]


def write_report(directory, out_dir=None) -> Path:
    """Write ``report.md`` and its PNGs for the artifact ``directory`` into ``out_dir`` (default: ``directory``)."""
    directory = Path(directory)
    out = Path(out_dir) if out_dir is not None else directory
    manifest = load_manifest(directory)
    spectra = load_spectra(directory / "spectra.safetensors")
    evaluation = load_evaluation(directory / "evaluation.json")
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        _header(manifest, directory),
        _ranks_section(manifest, out),
        _spectra_section(spectra, out),
        _reconstruction_section(manifest, out),
        _ratios_section(manifest, out),
        _evaluation_section(evaluation),
        _pareto_section(evaluation, out),
    ]
    path = out / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


# ---------------------------------------------------------------- reading


def load_manifest(directory: Path) -> dict:
    """The checked ``manifest.json`` of an artifact directory."""
    if not directory.is_dir():
        raise WsvdError(f"{directory} is not a directory: {_FIX}")
    manifest = read_manifest(directory)
    path = directory / "manifest.json"
    for key in ("recipe", "ranks", "heads", "reconstruction", "calibration", "environment", "finetune", "qat"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise WsvdError(f"{path}: {key!r} must be an object: rewrite the directory with wsvd compress --out")
    _check_per_layer(path, manifest)
    return manifest


def _check_per_layer(path: Path, m: dict) -> None:
    """Per-layer entries have layer-number keys and numeric values."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def numbers(v):
        return isinstance(v, list) and all(map(number, v))

    checks = {
        "ranks": lambda t: all(str(k).isdigit() and isinstance(v, dict) and all(map(numbers, v.values()))
                               for k, v in t.items()),
        "reconstruction": lambda t: all(str(k).isdigit() and isinstance(v, dict) and all(
            isinstance(e, dict) and all(x is None or number(x) for x in e.values()) for e in v.values())
            for k, v in t.items()),
        "rho1_per_layer": numbers,
        "rho2_per_layer": numbers,
    }
    for key, ok in checks.items():
        if m.get(key) is not None and not ok(m[key]):
            raise WsvdError(f"{path}: {key!r} is malformed (expected per-layer numbers keyed by layer): "
                            "rewrite the directory with wsvd compress --out")
    heads = m.get("heads") or {}
    if m.get("ranks") and not all(isinstance(heads.get(k), int) for k in _HEAD_KEYS):
        raise WsvdError(f"{path} has ranks but no heads {{{', '.join(_HEAD_KEYS)}}}: "
                        "rewrite the directory with wsvd compress --out")


def load_spectra(path: Path) -> dict[tuple[int, str], dict[int | None, dict[str, np.ndarray]]]:
    """``(layer, proj) -> head (None: whole group) -> {"before", "after"}`` arrays; {} if the file is absent."""
    if not path.is_file():
        return {}
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise WsvdError(f"{path} is not a readable safetensors file ({e}): "
                        "rewrite it with wsvd compress --out") from None
    spectra: dict = {}
    for name, values in tensors.items():
        match = _SPECTRUM_KEY.fullmatch(name)
        if match is None:
            raise WsvdError(f"{path} holds {name!r}, not layer<L>.<proj>[.head<h>].before|after: "
                            "rewrite it with wsvd compress --out")
        layer, proj, head, when = match.groups()
        group = spectra.setdefault((int(layer), proj), {})
        group.setdefault(None if head is None else int(head), {})[when] = values.astype(np.float64).ravel()
    return spectra


def load_evaluation(path: Path) -> list[dict]:
    """Rows of ``evaluation.json`` (a ``wsvd table --json`` list or one ``wsvd eval --json`` dict); [] if absent."""
    if not path.is_file():
        return []
    data = _read_json(path)
    rows = [data] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise WsvdError(f"{path} is neither a list of table rows nor one result object: write it with "
                        "wsvd table --json or wsvd eval --json")
    return rows


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WsvdError(f"{path} is not valid JSON ({e}): rewrite it with wsvd compress --out") from None


# ---------------------------------------------------------------- markdown


def _fmt(value) -> str:
    """A value as a markdown table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> list[list]:
    """``[[dotted key, value], ...]`` of a nested dict."""
    rows = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", value])
    return rows


def _key_values(title: str, d: dict | None, missing: str) -> str:
    if not d:
        return f"## {title}\n\n{missing}"
    return f"## {title}\n\n" + _table(["key", "value"], _flatten(d))


def _header(m: dict, directory: Path) -> str:
    rows = [["directory", str(directory)], ["model", m.get("model")], ["wsvd version", m.get("wsvd_version")],
            ["format version", m.get("format_version")]]
    rows += [[f"recipe.{k}", v] for k, v in _flatten(m.get("recipe") or {})]
    rows += [["bits", m.get("bits")], ["rho1 target", m.get("rho1_target")], ["rho1 achieved", m.get("rho1")],
             ["rho2", m.get("rho2")]]
    heads = m.get("heads") or {}
    rows += [[k.replace("_", " "), v] for k, v in heads.items()]
    parts = [f"# wsvd report: {m.get('model', '?')}", _table(["field", "value"], rows),
             _key_values("Calibration", m.get("calibration"), "No calibration provenance in manifest.json."),
             _key_values("Environment", m.get("environment"), "No environment in manifest.json."),
             _key_values("Fine-tuning", m.get("finetune"), "Fine-tuning: none recorded in manifest.json."),
             _key_values("QAT", m.get("qat"), "QAT: none recorded in manifest.json."),
             _key_values("Healing", m.get("heal"), "Healing: none recorded in manifest.json.")]
    return "\n\n".join(parts)


def _ranks_section(m: dict, out: Path) -> str:
    if not m.get("ranks"):
        return "## Ranks\n\nRanks: unavailable (manifest.json has no ranks)."
    _plot_ranks(m, out / "ranks.png")
    return ("## Ranks\n\nKept rank per layer and head; colour is rank / full rank (head_dim for a head).\n\n"
            "![ranks](ranks.png)")


def _spectra_section(spectra: dict, out: Path) -> str:
    if not spectra:
        return "## Singular-value spectra\n\nSpectra: unavailable (no spectra.safetensors)."
    layers = _representative_layers(sorted({layer for layer, _ in spectra}))
    _plot_spectra(spectra, layers, out / "spectra.png")
    shown = ", ".join(str(layer) for layer in layers)
    return (f"## Singular-value spectra\n\nLayers {shown}: all singular values of the scaled weight (solid) and "
            "of the compressed factor product (dashed); the dotted line marks the kept rank.\n\n"
            "![spectra](spectra.png)")


def _reconstruction_section(m: dict, out: Path) -> str:
    errors = m.get("reconstruction")
    if not errors:
        return "## Reconstruction error\n\nReconstruction error: unavailable (manifest.json has none)."
    _plot_reconstruction(errors, out / "reconstruction.png")
    projs = _projections(p for layer in errors.values() for p in layer)
    rows = [[int(layer)] + [errors[layer].get(p, {}).get(w) for p in projs for w in ("before_ft", "after")]
            for layer in _layer_keys(errors)]
    header = ["layer"] + [f"{p} {w.replace('_ft', ' FT')}" for p in projs for w in ("before_ft", "after")]
    return ("## Reconstruction error\n\nRelative error ||(W - U D) S||_F / ||W S||_F in the scaled coordinates, "
            "before and after fine-tuning.\n\n![reconstruction](reconstruction.png)\n\n" + _table(header, rows))


def _ratios_section(m: dict, out: Path) -> str:
    rho1, rho2 = m.get("rho1_per_layer") or [], m.get("rho2_per_layer") or []
    if not rho1 and not rho2:
        return "## Per-layer ratios\n\nPer-layer rho1/rho2: unavailable (manifest.json has none)."
    _plot_ratios(rho1, rho2, m.get("rho1_target"), out / "ratios.png")
    n = max(len(rho1), len(rho2))
    rows = [[i, rho1[i] if i < len(rho1) else None, rho2[i] if i < len(rho2) else None] for i in range(n)]
    return ("## Per-layer ratios\n\nrho1: factored Q/K/V parameters over dense; rho2: cached latent over the dense "
            "K+V cache.\n\n![ratios](ratios.png)\n\n" + _table(["layer", "rho1", "rho2"], rows))


def _evaluation_section(rows: list[dict]) -> str:
    if not rows:
        return "## Evaluation\n\nEvaluation: unavailable (no evaluation.json)."
    keys = [k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))]
    columns = [k for k in _EVAL_FIRST if k in keys] + [k for k in dict.fromkeys(keys) if k not in _EVAL_FIRST]
    return "## Evaluation\n\n" + _table(columns, [[r.get(k) for k in columns] for r in rows])


def _pareto_section(rows: list[dict], out: Path) -> str:
    points = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in ("kl", "cache_bytes_per_token"))]
    if len(points) < 2:
        return ("## KL vs cache size\n\nPareto plot: unavailable (evaluation.json has fewer than two rows with KL "
                "and cache bytes).")
    front = pareto_front(points)
    _plot_pareto(points, front, out / "pareto.png")
    return ("## KL vs cache size\n\nKL to the uncompressed model against K+V cache bytes per token (unpadded latents; "
            "int8 codes and float32 scales for latents quantised to <= 8 bits, else bfloat16); black: the Pareto front "
            "(no other row has both less cache and less KL).\n\n![pareto](pareto.png)\n\n"
            + _table(["recipe", "bits", "rho1", "rho2", "cache bytes/token", "kl"],
                     [[r.get("recipe"), r.get("bits"), r.get("rho1"), r.get("rho2"), r["cache_bytes_per_token"], r["kl"]]
                      for r in front]))


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both cache bytes and KL (ties on both keep the first), by cache size."""
    ordered = sorted(rows, key=lambda r: (r["cache_bytes_per_token"], r["kl"]))
    front, best = [], float("inf")
    for r in ordered:
        if r["kl"] < best:
            front.append(r)
            best = r["kl"]
    return front


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A figure drawn by the Agg backend (no display, no pyplot state)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _layer_keys(d: dict) -> list[str]:
    return sorted(d, key=int)


def _projections(names) -> list[str]:
    """``["qkv"]`` for joint factors, else q, k, v (in that order) as present."""
    present = set(names)
    return ["qkv"] if "qkv" in present else [p for p in ("q", "k", "v") if p in present]


def _full_rank(m: dict, proj: str, columns: int) -> int:
    """The largest possible rank of one column's weight group (head_dim for a head)."""
    n, kv, d, hidden = (m["heads"][k] for k in _HEAD_KEYS)
    rows = {"q": n * d, "k": kv * d, "v": kv * d, "qkv": (n + 2 * kv) * d}[proj]
    return d if columns > 1 else min(rows, hidden)


def _plot_ranks(m: dict, path: Path) -> None:
    ranks = m["ranks"]
    layers = _layer_keys(ranks)
    projs = _projections(p for layer in ranks.values() for p in layer)
    grids = {p: _rank_grid([ranks[layer].get(p, []) for layer in layers]) for p in projs}
    widths = [g.shape[1] for g in grids.values()]
    fig = _figure(max(4.0, 1.2 + 0.45 * sum(widths) + 1.2 * len(projs)), max(2.5, 1.2 + 0.3 * len(layers)))
    axes = fig.subplots(1, len(projs), squeeze=False, width_ratios=widths)[0]
    for ax, p in zip(axes, projs):
        grid = grids[p]
        share = grid / _full_rank(m, p, grid.shape[1])
        image = ax.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        if grid.size <= 400:
            for (i, j), r in np.ndenumerate(grid):
                if not np.isnan(r):
                    ax.text(j, i, f"{r:.0f}", ha="center", va="center", fontsize=7,
                            color="w" if share[i, j] < 0.6 else "k")
        ax.set_title(p)
        ax.set_xlabel("head" if grid.shape[1] > 1 else "")
        ax.set_xticks(range(grid.shape[1]) if grid.shape[1] > 1 else [])
        step = max(1, len(layers) // 20)
        ax.set_yticks(range(0, len(layers), step), layers[::step])
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="rank / full rank")
    fig.suptitle(f"kept ranks (head_dim {m['heads']['head_dim']})")
    fig.savefig(path)


def _rank_grid(rows: list[list]) -> np.ndarray:
    """Ragged rank lists as a [layers, max heads] float array padded with NaN."""
    width = max([1] + [len(r) for r in rows])
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    return grid


def _representative_layers(layers: list[int]) -> list[int]:
    """First, middle and last layer."""
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def _plot_spectra(spectra: dict, layers: list[int], path: Path, max_heads: int = 4) -> None:
    projs = _projections(p for _, p in spectra)
    fig = _figure(3.6 * len(projs), 2.8 * len(layers))
    axes = fig.subplots(len(layers), len(projs), squeeze=False)
    colours = [f"C{i}" for i in range(10)]
    for row, layer in zip(axes, layers):
        for ax, p in zip(row, projs):
            groups = spectra.get((layer, p), {})
            for colour, head in zip(colours, _spread(sorted(groups, key=lambda h: -1 if h is None else h), max_heads)):
                _plot_spectrum(ax, groups[head], colour, "all" if head is None else f"head {head}")
            ax.set_yscale("log")
            ax.set_title(f"layer {layer} {p}")
            ax.set_xlabel("index")
            if groups:
                ax.legend(fontsize=6)
    fig.savefig(path)


def _spread(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced, first and last included."""
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _plot_spectrum(ax, spectrum: dict[str, np.ndarray], colour: str, label: str) -> None:
    before, after = spectrum.get("before"), spectrum.get("after")
    rank = None if after is None else len(after)
    if before is not None:
        ax.plot(np.arange(1, len(before) + 1), np.clip(before, 1e-12, None), color=colour,
                label=label if rank is None else f"{label}, r={rank}")
    if after is not None and rank:
        ax.plot(np.arange(1, rank + 1), np.clip(after, 1e-12, None), color=colour, linestyle="--")
    if rank:
        ax.axvline(rank, color=colour, linestyle=":", linewidth=1)


def _plot_reconstruction(errors: dict, path: Path) -> None:
    layers = _layer_keys(errors)
    x = [int(layer) for layer in layers]
    fig = _figure(6.4, 3.6)
    ax = fig.subplots()
    for colour, p in zip(["C0", "C1", "C2", "C3"], _projections(p for layer in errors.values() for p in layer)):
        for when, style in (("before_ft", "-"), ("after", "--")):
            y = [errors[layer].get(p, {}).get(when) for layer in layers]
            y = [np.nan if v is None else float(v) for v in y]
            ax.plot(x, y, color=colour, linestyle=style, marker="o", markersize=3,
                    label=f"{p} {'before FT' if when == 'before_ft' else 'after'}")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("relative error (scaled)")
    ax.set_title("per-layer reconstruction error")
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(path)


def _plot_ratios(rho1: list[float], rho2: list[float], target, path: Path) -> None:
    fig = _figure(max(6.4, 0.3 * max(len(rho1), len(rho2))), 3.6)
    ax = fig.subplots()
    ax.bar(np.arange(len(rho1)) - 0.2, rho1, width=0.4, label="rho1 (parameters)")
    ax.bar(np.arange(len(rho2)) + 0.2, rho2, width=0.4, label="rho2 (KV cache)")
    if isinstance(target, (int, float)):
        ax.axhline(target, color="k", linestyle=":", linewidth=1, label=f"rho1 target {target:g}")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ratio")
    ax.set_title("per-layer compression ratios")
    ax.legend(fontsize=7)
    fig.savefig(path)


def _plot_pareto(rows: list[dict], front: list[dict], path: Path) -> None:
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(f"{r.get('recipe')} {r.get('bits', '')}".strip(), []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["cache_bytes_per_token"])
        ax.plot([r["cache_bytes_per_token"] for r in rs], [r["kl"] for r in rs], marker="o", markersize=4, label=label)
    ax.step([r["cache_bytes_per_token"] for r in front], [r["kl"] for r in front], where="post", color="k",
            linewidth=1, label="Pareto front")
    ax.set_xlabel("K+V cache bytes per token")
    ax.set_ylabel("KL to uncompressed (nats/token)")
    ax.set_title("KL vs cache size")
    ax.legend(fontsize=7)
    fig.savefig(path)
