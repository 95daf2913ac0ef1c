"""Healing on SmolLM2-135M, from a compressed artifact: evaluate the uncompressed model, the artifact and the
artifact healed with each STEPS:LR:WARMUP:BATCH setting, all in one run (the dense logits computed once).

    wsvd compress --model smollm2-135m --recipe wsvd-noq --rho1 0.5 --save-dtype float32 --no-stream --out runs/noq
    python examples/heal_smollm2.py runs/noq 30:1e-4:0.1:2 30:3e-4:0.1:2
    python examples/heal_smollm2.py runs/noq 30:1e-4:0.1:2 --teacher-topk 0     # the exact dense logits as teacher

Healing is the last pass of a `-heal` recipe, so healing the float32 artifact of `wsvd-noq` (or of `wsvd`, whose
recorded bits put the weight quantiser and S2 in the loop) is what `compress` does for `wsvd-heal-noq` (`wsvd-heal`),
with the setting given here instead of the recipe's. Calibration: 64 windows of the calibration half (the artifact's
default; ``--heal-windows N``: the first N, as `compress --heal-windows`), the last 8 held back for validation;
evaluation: 32 windows of the evaluation half, measured after healing and never seen by it (choose settings by the
validation KL in the healing report, not by these figures). The teacher keeps the dense model's top
``--teacher-topk`` tokens per position (the default of ``LogitKL``; 0: the exact logits).
Prints one JSON line per row: ppl, its ratio to fp, KL and top-1 against the uncompressed model, and for a healed
row the healing's wall and CPU seconds (user + sys, all threads) and its report (calibration and validation KL,
validation curve)."""

import argparse
import copy
import json
import time

import torch

from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.artifacts import artifact
from wsvd_passes.eval.data import pydoc_text, token_windows
from wsvd_passes.eval.evaluation import MemoLogits, evaluate
from wsvd_passes.graph.capture import capture_forward
from wsvd_passes.graph.pipeline import Pipeline
from wsvd_passes.models.registry import load_model
from wsvd_passes.passes.heal import TEACHER_TOPK, Heal, LogitKL

parser = argparse.ArgumentParser(description="heal a SmolLM2-135M artifact with each setting")
parser.add_argument("artifact")
parser.add_argument("settings", nargs="+", metavar="STEPS:LR:WARMUP:BATCH")
parser.add_argument("--teacher-topk", type=int, default=TEACHER_TOPK, help="dense tokens kept per position; 0: exact")
parser.add_argument("--heal-windows", type=int, help="calibration windows to heal on (default: the artifact's)")
args = parser.parse_args()
if any(len(a.split(":")) != 4 for a in args.settings):
    parser.error("each setting is STEPS:LR:WARMUP:BATCH")
torch.set_num_threads(2)
lm = load_model("smollm2-135m")
art = artifact.load(args.artifact, model=lm)
base = capture_forward(lm.model)
calibration = art.manifest["calibration"]
if calibration["source"] != "pydoc_data.topics:calibration":
    parser.exit(2, f"error: {args.artifact} was calibrated on {calibration['source']}; this script heals on the pydoc "
                "calibration half\n")
calw = token_windows(lm.tokenizer, pydoc_text("calibration"), calibration["seq_len"],
                     args.heal_windows or calibration["windows"])
evw = token_windows(lm.tokenizer, pydoc_text("evaluation"), 256, 32)
ref = MemoLogits(lambda ids: base.gm(input_ids=ids))
fp = evaluate(ref, evw, progress=False)
print(json.dumps({"row": "fp", "ppl": fp.ppl}), flush=True)


def row(name, graph, **extra):
    r = evaluate(lambda ids: graph.gm(input_ids=ids), evw, reference=ref, progress=False)
    print(json.dumps({"row": name, "ppl": r.ppl, "x_fp": r.ppl / fp.ppl, "kl": r.kl, "top1": r.top1, **extra}), flush=True)


recipe = art.manifest["recipe"]
row(recipe["name"], art.captured)
weight_bits = parse_bits(art.manifest["bits"]).weight if recipe["quantize"] else 16
objective = LogitKL(base, args.teacher_topk)
for setting in args.settings:
    steps, lr, warmup, batch = setting.split(":")
    graph = copy.deepcopy(art.captured)
    p = Heal(objective, calw, steps=int(steps), lr=float(lr), warmup=float(warmup), batch_size=int(batch),
             weight_bits=weight_bits, s2=recipe["qat"], s2_lr=recipe["qat_s2_lr"])
    t, c = time.time(), time.process_time()
    Pipeline([p])(graph)
    row(f"{recipe['name']} healed {setting}", graph, wall=time.time() - t, cpu=time.process_time() - c, heal=p.report)
    del graph
