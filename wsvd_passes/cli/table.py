"""``wsvd table``: perplexity / KL / top-1 of recipes at several ratios and bit widths, one calibration
(the WSVD paper's Table 1 analog)."""

from __future__ import annotations

import time

from .common import add_calibration, add_device, add_heal, add_model, prepare, ratio_targets, tuned_recipe


def add_parser(sub) -> None:
    ta = sub.add_parser("table", help="perplexity / KL / top-1 of recipes at several ratios (WSVD Table 1 analog)")
    add_model(ta)
    add_device(ta)
    ta.add_argument("--recipes", default="svd,asvd,svd-llm,qsvd-noq,wsvd-noft,wsvd-noq")
    ta.add_argument("--rho1", help="comma-separated ratios (default 0.9,0.8,0.7,0.6,0.5 without --rho2)")
    ta.add_argument("--rho2", help="comma-separated K+V cache ratios: ranks allocated under the cache budget "
                    "(with --rho1: every pair, both budgets at once)")
    ta.add_argument("--data", help="evaluation text file (default: evaluation half of pydoc_data.topics)")
    ta.add_argument("--eval-windows", type=int, default=32, help="evaluation windows (default 32)")
    add_calibration(ta)
    ta.add_argument("--bits", default="w16a16", help="w8a8, w4a4, w8a4, w4a8 or w16a16 for quantising recipes "
                    "(any `wsvd compress --bits` setting); a comma-separated list runs each (one calibration)")
    ta.add_argument("--tune-beta", action="store_true",
                    help="tune QSVD's beta (Sigma split) of quantising factor recipes on 8 calibration windows")
    add_heal(ta)
    ta.add_argument("--json", dest="json_out", help="write the rows to this JSON file")
    ta.set_defaults(run=cmd_table)


def cmd_table(args) -> list[dict]:
    from ..algorithms.quantize import parse_bits
    from ..compression.compress import cache_bytes_per_token, compress
    from ..eval.data import text_source, token_windows
    from ..eval.evaluation import MemoLogits, evaluate
    from ..graph.sites import find_sites

    points = ratio_targets(args, single=False)
    settings = [parse_bits(b.strip()) for b in args.bits.split(",")]
    lm, captured, calib, recipes, provenance = prepare(args, args.recipes.split(","))
    text, eval_source = text_source(args.data, "evaluation")
    windows = token_windows(lm.tokenizer, text, args.seq_len, args.eval_windows)
    reference = MemoLogits(lambda ids: captured.gm(input_ids=ids))
    fp = evaluate(reference, windows, progress=not args.quiet, device=captured.device)
    sites = find_sites(captured.gm)
    rows = [{"recipe": "fp", "rho1": 1.0, "rho2": 1.0, "bits": "w16a16", "ppl": fp.ppl, "kl": 0.0, "top1": 1.0,
             "tokens": fp.tokens,
             "cache_bytes_per_token": cache_bytes_per_token(sites, None, recipes[0], parse_bits("w16a16"))}]
    print(f"{'recipe':<11}{'rho1':>6}{'got':>7}{'rho2':>7}{'bits':>8}{'ppl':>10}{'kl':>9}{'top1':>8}{'sec':>6}")
    print(f"{'fp':<11}{1.0:>6.2f}{1.0:>7.3f}{1.0:>7.3f}{'w16a16':>8}{fp.ppl:>10.3f}{0.0:>9.4f}{1.0:>8.4f}")
    quantising = [r for r in recipes if r.quantize]
    runs = [(r, b) for r in recipes if not r.quantize for b in settings[:1]] + [(r, b) for b in settings for r in quantising]
    for recipe, bits in runs:
        spec = bits.name if recipe.quantize else "w16a16"
        for rho1, rho2_target in points if recipe.factor else [(1.0, None)]:
            start = time.perf_counter()
            tuned, beta_losses = tuned_recipe(args, captured, calib, recipe, rho1, bits, rho2_target)
            compressed, report = compress(captured, calib, tuned, rho1, bits, rho2=rho2_target, progress=not args.quiet)
            r = evaluate(lambda ids: compressed.gm(input_ids=ids), windows, reference=reference, progress=False,
                         device=captured.device)
            seconds = time.perf_counter() - start
            got, rho2 = (report.rho1, report.rho2) if report else (1.0, 1.0)
            rows.append({"recipe": recipe.name, "rho1": rho1, "rho1_achieved": got, "rho2": rho2,
                         "rho2_target": rho2_target, "bits": spec,
                         "cache_bytes_per_token": cache_bytes_per_token(sites, report, tuned, bits),
                         "ppl": r.ppl, "kl": r.kl, "top1": r.top1, "tokens": r.tokens, "seconds": round(seconds, 1),
                         "above_break_even": len(report.above_break_even) if report else 0,
                         "beta": tuned.beta, "beta_losses": beta_losses, "qat": report.qat if report else None,
                         "heal": report.heal if report else None})
            target = f"{rho1:.2f}" if rho1 is not None else f"c{rho2_target:.2f}"  # c: a cache (rho2) target
            print(f"{recipe.name:<11}{target:>6}{got:>7.3f}{rho2:>7.3f}{spec:>8}{r.ppl:>10.3f}"
                  f"{r.kl:>9.4f}{r.top1:>8.4f}{seconds:>6.0f}", flush=True)
            del compressed
    print(f"model {lm.name}; calibration {provenance['source']} ({provenance['windows']} x {provenance['seq_len']} "
          f"tokens, {provenance['grad_samples']} gradient samples, {provenance['seconds']} s); "
          f"evaluation {eval_source['source']} ({len(windows)} windows)")
    for row in rows:
        row.update(model=lm.name)
    return rows
