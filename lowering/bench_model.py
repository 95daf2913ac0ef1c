"""``wsvd bench model --artifact DIR``: what a compressed artifact costs and gains at decode, against its own
uncompressed model, measured in one run.

Variants of one decode step (each ``torch.compile``d unless ``compile=False``), per batch B and cache length L:

- ``dense-fp32``, ``dense-bf16``: the base model's static-cache decode graph as captured (Hugging Face's step);
- ``fake-quant``: the artifact's decode graph with its latent KV cache, lowered to ``wsvd::latent_attention``,
  quantisers simulated in float32 (what ``wsvd eval`` scores);
- ``int8``: the same graph after :func:`~lowering.int8.lower_int8` (W8A8 linears as ``torch._int_mm``, 8-bit
  tables as int8); latents quantised to 8 bits or fewer are cached as int8 codes + scales by the lowering in
  both compressed variants. Only quantising recipes at W8A8 (or e8) have an int8 variant.

Before timing, each variant decodes ``CHECK_STEPS`` seeded tokens from an empty cache (so the cache holds the
model's own keys and values) and its logits [T, B, V] are compared. ``int8`` computes ``fake-quant``'s function
with other float roundings, and a quantised model amplifies roundings: an activation on a rounding boundary
flips a code, and the flips grow over the layers. So the yardstick is measured in the same run: each
compressed variant compiled against itself in eager mode (SmolLM2-135M W8A8 at batch 1: fake-quant 1.1e-2,
int8 2.3e-2 relative, where the float model's compiled-vs-eager is 7e-7); ``int8`` passes at a relative
Frobenius error <= max(``INT8_TOLERANCE``, ``FLOOR_FACTOR`` x the larger floor), else it is reported and
not timed (with ``compile=False`` the floors are 0: the strict tolerance holds only where no code flips, as on
the tiny test models). ``dense-bf16`` against ``dense-fp32`` is
reported (relative error, top-1 agreement), not gated: bfloat16 is another precision, not a bug.

Timing: every cache buffer is filled with random values of its dtype (timings do not depend on the content),
and every variant of a (B, L) row is built, compiled and warmed up (three steps) before any is timed. Then
``rounds`` rounds each time ``steps`` decode steps at positions ``L - steps .. L - 1`` of every variant, one
after the other (the order rotates each round), after one warm-up step; tokens/s = B * steps / seconds. A
variant's tokens/s is its median over the rounds, and its speed against dense fp32 the median of the
per-round ratios: on a shared host whose speed drifts by 2x over minutes (dense fp32 at B8 x 2048 measured
9.9..23.3 tok/s in runs timed one variant after the other), the paired ratio of one round's neighbours is
what is stable. The JSON keeps every round. Memory: the bytes of the tensors each variant holds (parameters and buffers,
shared storage counted once), split into weights and KV cache (``cache_buffers``); not the process RSS, which
also counts the compiler and allocator.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time

import torch

from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.artifacts.artifact import load, read_manifest
from wsvd_passes.eval.generation import cache_buffers
from wsvd_passes.graph.capture import CapturedGraph, capture_decode
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.models.registry import cast_parameters, load_model
from wsvd_passes.passes.latent_kv import LatentKVCache

from .bench import versions
from .compile import compile_step, lower
from .int8 import lower_int8

INT8_TOLERANCE = 1e-4  # float32 rounding of the scaled integer sums when no code flips (tiny-llama-gqa: 2e-7)
FLOOR_FACTOR = 2.0  # int8 vs fake-quant may differ by up to twice fake-quant's own compiled-vs-eager difference
CHECK_STEPS = 8
VARIANTS = ("dense-fp32", "dense-bf16", "fake-quant", "int8")


def held_bytes(decoder: CapturedGraph) -> dict[str, int]:
    """Bytes of the weights and of the KV cache a decode graph holds (each storage once)."""
    caches = {id(t) for t in cache_buffers(decoder).values()}
    seen, out = set(), {"weights": 0, "kv_cache": 0}
    for t in [*decoder.gm.parameters(), *decoder.gm.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        out["kv_cache" if id(t) in caches else "weights"] += t.untyped_storage().nbytes()
    return out


def _fill(decoder: CapturedGraph, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in cache_buffers(decoder).values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
            else:
                t.copy_(torch.randint(-127, 128, t.shape, generator=g).to(t.dtype))


def _variant(kind: str, lm, artifact: str, batch: int, cache_len: int) -> CapturedGraph:
    if kind.startswith("dense"):
        model = lm.model if kind == "dense-fp32" else cast_parameters(copy.deepcopy(lm.model), torch.bfloat16)
        return capture_decode(model, batch_size=batch, max_cache_len=cache_len)
    decoder = load(artifact, decode=True, batch_size=batch, max_cache_len=cache_len, model=lm).captured
    Pipeline([LatentKVCache(decoder.config)])(decoder)
    lower(decoder)
    if kind == "int8":
        lower_int8(decoder)
    return decoder


def _steps(step, batch: int, cache_len: int, steps: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (steps + 3, batch, 1), generator=g)
    positions = [cache_len - steps - 3 + i for i in range(steps + 3)]  # 3 warm-up steps, then the timed ones
    return [(lambda i=i: step(input_ids=ids[i], cache_position=torch.tensor([positions[i]]))) for i in range(steps + 3)]


def _logits(out) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _from_empty_cache(step, decoder: CapturedGraph, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, B, V] of decoding ``ids`` [T, >=B, 1] at positions 0..T-1 from a zeroed cache."""
    batch = next(iter(decoder.example_kwargs.values())).shape[0]
    with torch.no_grad():
        for t in cache_buffers(decoder).values():
            t.zero_()
        return torch.stack([_logits(step(input_ids=i[:batch], cache_position=torch.tensor([p])))
                            for p, i in enumerate(ids)])


def _compare(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    return {"rel_err": float((logits - reference).norm() / reference.norm()),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())}


def bench_model(artifact: str, *, batches=(1, 8), cache_lens=(512, 2048), steps: int = 16, rounds: int = 5,
                compile: bool = True, seed: int = 0, progress: bool = True) -> dict:
    """Measure every variant at every (batch, cache length); see the module docstring."""
    manifest = read_manifest(artifact)
    bits = parse_bits(manifest["bits"])
    kinds = [k for k in VARIANTS if k != "int8" or manifest["recipe"]["quantize"] and
             ((bits.weight, bits.activation) == (8, 8) or bits.embedding == 8)]
    if not manifest["recipe"]["factor"]:
        raise ValueError(f"{artifact}: recipe {manifest['recipe']['name']} has no low-rank factors, so no latent cache: "
                         "bench model measures factored recipes")
    lm = load_model(manifest["model"])
    vocab = lm.model.config.vocab_size
    fp16_bytes = 2 * sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
    runs = []
    check_ids = torch.randint(0, vocab, (CHECK_STEPS, max(batches), 1), generator=torch.Generator().manual_seed(seed + 1))
    for cache_len in cache_lens:
        for batch in batches:
            row = {"batch": batch, "cache_len": cache_len, "variants": {}}
            reference, live = {}, {}
            for kind in kinds:
                decoder = _variant(kind, lm, artifact, batch, cache_len)
                _fill(decoder, seed)
                step = compile_step(decoder) if compile else decoder.gm
                checked = _from_empty_cache(step, decoder, check_ids[:cache_len])  # compiles
                entry = {"memory": held_bytes(decoder)}
                if kind in ("fake-quant", "int8"):
                    entry["compiled_vs_eager"] = _compare(checked, _from_empty_cache(decoder.gm, decoder, check_ids[:cache_len]))
                against = {"dense-bf16": "dense-fp32", "int8": "fake-quant"}.get(kind)
                if against in reference:
                    entry["check"] = {"against": against, **_compare(checked, reference[against]), "passed": None}
                    if kind == "int8":
                        floor = max(v["compiled_vs_eager"]["rel_err"] for v in (row["variants"]["fake-quant"], entry))
                        tol = max(INT8_TOLERANCE, FLOOR_FACTOR * floor)
                        entry["check"].update(tolerance=tol, passed=entry["check"]["rel_err"] <= tol)
                reference[kind] = checked
                _fill(decoder, seed)
                row["variants"][kind] = entry
                if entry.get("check", {}).get("passed") is False:
                    if progress:
                        print(f"  B{batch} L{cache_len} {kind:<11} check FAILED: not timed", flush=True)
                    continue
                calls = _steps(step, batch, cache_len, steps, vocab, seed)
                with torch.no_grad():
                    for call in calls[:3]:
                        call()
                live[kind] = (decoder, calls)
            _time_rounds(row, live, batch, steps, rounds, progress)
            decoder = step = checked = calls = None  # the last variant's, so that the reset below can free it
            live.clear()
            torch._dynamo.reset()  # drop the compiled graphs (and the weights they hold)
            base = row["variants"]["dense-fp32"]
            for entry in row["variants"].values():
                entry["memory_vs_dense_fp32"] = sum(entry["memory"].values()) / sum(base["memory"].values())
            runs.append(row)
    return {"artifact": str(artifact), "model": manifest["model"], "recipe": manifest["recipe"]["name"],
            "bits": manifest["bits"], "rho1": manifest.get("rho1"), "rho2": manifest.get("rho2"),
            "artifact_bytes": manifest["bytes"], "fp16_model_bytes": fp16_bytes,
            "artifact_vs_fp16": manifest["bytes"] / fp16_bytes, "steps": steps, "rounds": rounds, "compiled": compile,
            "machine": _machine(),
            "versions": versions(), "runs": runs}


def _time_rounds(row: dict, live: dict, batch: int, steps: int, rounds: int, progress: bool) -> None:
    """Time ``rounds`` rounds of every live variant, interleaved; store per-round and median figures in ``row``."""
    kinds = list(live)
    per_round = {k: [] for k in kinds}
    with torch.no_grad():
        for r in range(rounds):
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                calls = live[kind][1]
                calls[2]()
                begin = time.perf_counter()
                for call in calls[3:]:
                    call()
                per_round[kind].append(batch * steps / (time.perf_counter() - begin))
    for kind in kinds:
        entry = row["variants"][kind]
        entry.update(tokens_per_s_rounds=per_round[kind], tokens_per_s=statistics.median(per_round[kind]))
        if "dense-fp32" in per_round:
            ratios = [a / b for a, b in zip(per_round[kind], per_round["dense-fp32"])]
            entry.update(speed_vs_dense_fp32=statistics.median(ratios), speed_vs_dense_fp32_range=[min(ratios), max(ratios)])
        if progress:
            print(f"  B{batch} L{row['cache_len']} {kind:<11} {entry['tokens_per_s']:8.1f} tok/s (median of {rounds} rounds: "
                  f"{min(per_round[kind]):.1f}..{max(per_round[kind]):.1f})", flush=True)


def _machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    return {"device": "cpu", "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def print_model(result: dict) -> None:
    v = result["versions"]
    print(f"{result['model']} {result['recipe']} {result['bits']} rho1 {result['rho1']:.2f} rho2 {result['rho2']:.2f}; "
          f"{result['machine']['cpu']}, {result['machine']['torch_threads']} threads; torch {v['torch']}, transformers {v['transformers']}; "
          f"compiled={result['compiled']}, {result['rounds']} interleaved rounds of {result['steps']} steps "
          f"(tok/s: median of the rounds; x fp32: median of the per-round ratios [min..max])")
    print(f"artifact {result['artifact_bytes'] / 1e6:.1f} MB = {result['artifact_vs_fp16']:.3f} x the fp16 model "
          f"({result['fp16_model_bytes'] / 1e6:.1f} MB)")
    print(f"{'batch':>5} {'cache':>6} {'variant':<11} {'tok/s':>9} {'x fp32':>7} {'range':>11} {'weights MB':>11} {'KV MB':>8} "
          f"{'x fp32 mem':>10}  check")
    for row in result["runs"]:
        for kind, e in row["variants"].items():
            speed = (f"{e['tokens_per_s']:9.1f} {e['speed_vs_dense_fp32']:7.2f} "
                     f"{'%.2f..%.2f' % tuple(e['speed_vs_dense_fp32_range']):>11}" if "tokens_per_s" in e
                     else f"{'-':>9} {'-':>7} {'-':>11}")
            check, floor = e.get("check"), e.get("compiled_vs_eager")
            verdict = "; ".join(
                ([f"{ {True: 'ok ', False: 'FAILED ', None: ''}[check['passed']]}rel {check['rel_err']:.1e}, top-1 "
                  f"{100 * check['top1_agreement']:.0f}% vs {check['against']}"] if check else []) +
                ([f"compiled vs eager: rel {floor['rel_err']:.1e}, top-1 {100 * floor['top1_agreement']:.0f}%"]
                 if floor else []))
            print(f"{row['batch']:>5} {row['cache_len']:>6} {kind:<11} {speed} {e['memory']['weights'] / 1e6:11.1f} "
                  f"{e['memory']['kv_cache'] / 1e6:8.1f} {e['memory_vs_dense_fp32']:10.3f}  {verdict}")
