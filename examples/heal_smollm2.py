"""Healing on SmolLM2-135M: wsvd-noq at rho1 0.5 without healing and with healing at the given STEPS:LR
pairs (e.g. `python examples/heal_smollm2.py 60:1e-5 60:3e-5`), calibration 64 windows of the calibration half,
evaluation 32 windows of the evaluation half (ppl, KL and top-1 against the uncompressed model, measured in the
same run). Prints one JSON line per setting with wall and CPU seconds of its compression.
The `wsvd table` equivalent: `wsvd table --model smollm2-135m --recipes wsvd-noq,wsvd-heal-noq --rho1 0.5`."""

import dataclasses
import json
import sys
import time

import torch

from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.compression.compress import calibrate, compress
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.eval.data import pydoc_text, token_windows
from wsvd_passes.eval.evaluation import MemoLogits, evaluate
from wsvd_passes.graph.capture import capture_forward
from wsvd_passes.models.registry import load_model

torch.set_num_threads(2)
lm = load_model("smollm2-135m")
calw = token_windows(lm.tokenizer, pydoc_text("calibration"), 256, 64)
evw = token_windows(lm.tokenizer, pydoc_text("evaluation"), 256, 32)
base = capture_forward(lm.model)
t = time.time(); r = RECIPES["wsvd-heal-noq"]
calib = calibrate(base, calw, [r], progress=False); print("calib", time.time() - t, flush=True)
ref = MemoLogits(lambda ids: base.gm(input_ids=ids))
fp = evaluate(ref, evw, progress=False); print("fp", fp.ppl, flush=True)
for steps, lr in [(0, 0)] + [(int(a.split(":")[0]), float(a.split(":")[1])) for a in sys.argv[1:]]:
    t = time.time(); c0 = time.process_time()
    c, rep = compress(base, calib, dataclasses.replace(r, heal_steps=steps, heal_lr=lr or 1e-5), 0.5, parse_bits("w16a16"))
    res = evaluate(lambda ids: c.gm(input_ids=ids), evw, reference=ref, progress=False)
    print(json.dumps({"steps": steps, "lr": lr, "ppl": res.ppl, "kl": res.kl, "top1": res.top1, "rho2": rep.rho2,
                      "wall": time.time() - t, "cpu": time.process_time() - c0, "heal": rep.heal}), flush=True)
    del c
