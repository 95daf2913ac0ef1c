"""Layer-local healing in streamed compression on SmolLM2-135M: `wsvd-noq` and `wsvd-heal-noq` (STEPS:LR pairs, e.g.
`python examples/heal_streamed_smollm2.py 100:1e-5 100:1e-4`), compressed layer by layer (`wsvd compress --stream`)
from the cached float32 checkpoint at rho1 0.5; calibration 64 windows of the calibration half, evaluation 32 windows
of the evaluation half (ppl, KL and top-1 of the reloaded artifact against the uncompressed model, measured in the
same run), as `examples/heal_smollm2.py` does for the whole-model (end-to-end) healing. Prints one JSON line per
setting with the wall and CPU seconds of its compression and the healing report (each layer's relative output error)."""

import dataclasses
import json
import sys
import tempfile
import time

import torch

from wsvd_passes.algorithms.quantize import parse_bits
from wsvd_passes.artifacts import artifact
from wsvd_passes.compression.recipes import RECIPES
from wsvd_passes.compression.stream import compress_checkpoint
from wsvd_passes.eval.data import pydoc_text, token_windows
from wsvd_passes.eval.evaluation import MemoLogits, evaluate
from wsvd_passes.graph.capture import capture_forward
from wsvd_passes.models.registry import load_model, smollm2_checkpoint


def main() -> None:
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m")
    path = smollm2_checkpoint()
    calw = token_windows(lm.tokenizer, pydoc_text("calibration"), 256, 64)
    evw = token_windows(lm.tokenizer, pydoc_text("evaluation"), 256, 32)
    base = capture_forward(lm.model)
    ref = MemoLogits(lambda ids: base.gm(input_ids=ids))
    fp = evaluate(ref, evw, progress=False)
    print(json.dumps({"recipe": "fp", "ppl": fp.ppl}), flush=True)
    settings = [("wsvd-noq", 0, 0.0)] + [("wsvd-heal-noq", int(a.split(":")[0]), float(a.split(":")[1]))
                                        for a in sys.argv[1:]]
    for name, steps, lr in settings:
        recipe = dataclasses.replace(RECIPES[name], heal_steps=steps, heal_lr=lr or RECIPES[name].heal_lr)
        with tempfile.TemporaryDirectory() as out:
            start, cpu = time.time(), time.process_time()
            manifest = compress_checkpoint(path, calw, recipe, 0.5, parse_bits("w16"), out, calibration={},
                                           environment={}, progress=False)
            wall, cpu = time.time() - start, time.process_time() - cpu
            loaded = artifact.load(out, model=lm)
            res = evaluate(lambda ids: loaded.captured.gm(input_ids=ids), evw, reference=ref, progress=False)
        print(json.dumps({"recipe": name, "steps": steps, "lr": lr, "ppl": res.ppl, "kl": res.kl, "top1": res.top1,
                          "rho2": manifest["rho2"], "wall": round(wall, 1), "cpu": round(cpu, 1),
                          "heal": manifest["heal"]}), flush=True)


if __name__ == "__main__":
    main()
