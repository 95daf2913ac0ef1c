"""Named compression recipes, after the methods they reproduce.

| recipe      | granularity | scaling         | ranks      | Fisher FT | reproduces                         |
|-------------|-------------|-----------------|------------|-----------|------------------------------------|
| svd         | projection  | none            | uniform    | no        | plain truncated SVD of W_q, W_k, W_v |
| asvd        | projection  | ASVD (alpha .5) | uniform    | no        | ASVD (Yuan et al. 2023)            |
| svd-llm     | projection  | whitening       | uniform    | no        | SVD-LLM (Wang et al. 2024)         |
| qsvd-noq    | joint       | ASVD (alpha .5) | importance | no        | QSVD without quantisation          |
| wsvd-noft   | head        | whitening       | importance | no        | WSVD-noFT                          |
| wsvd-noq    | head        | whitening       | importance | yes       | WSVD-noQ (Algorithm 1)             |
| rtn         | -           | -               | -          | -         | round-to-nearest W/A quantisation  |
| quarot      | -           | -               | -          | -         | QuaRot: rotations + RTN            |
| qsvd        | joint       | ASVD (alpha .5) | importance | no        | QSVD: qsvd-noq + rotations + quant |
| wsvd-noqat  | head        | whitening       | importance | yes       | WSVD without local QAT             |
| wsvd        | head        | whitening       | importance | yes       | WSVD: wsvd-noq + rotations + S2 + local QAT + quant |

The baselines factor Q, K and V separately, as the WSVD paper does for them. The last four
quantise (``--bits``): weights per output channel with a clipping search, activations
per token (latents per token per head); rotations come first. ``wsvd`` then trains a
per-head orthogonal S2 with the factors against the deployment quantiser
(:mod:`wsvd_passes.passes.qat`; paper: lr 1e-5, 50 steps). The ``-heal`` recipes then train the factors
(and S2) end to end on KL(dense || compressed) over the calibration windows (:mod:`wsvd_passes.passes.heal`);
``heal_steps`` turns healing on for any factor recipe.
"""

from __future__ import annotations

import dataclasses

from ..errors import WsvdError


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    granularity: str  # "projection" | "joint" | "head"
    scaling: str  # "none" | "asvd" | "whiten"
    allocation: str  # "uniform" | "importance"
    finetune: bool = False
    alpha: float = 0.5  # ASVD exponent
    beta: float = 0.5  # Sigma split: down gets Sigma^beta, up Sigma^(1-beta)
    finetune_steps: int = 100
    finetune_lr: float = 1e-4
    factor: bool = True  # False: no low-rank factors (quantisation-only baselines)
    rotate: bool = False  # RMSNorm fusion + Hadamard S1, per-head V Hadamard, online Hadamard
    quantize: bool = False  # fake-quant weights and activations at the requested bits
    qat: bool = False  # learnable S2 + Fisher-weighted local QAT (needs rotate, quantize, granularity "head")
    qat_steps: int = 50
    qat_lr: float = 1e-5  # Adam on the factors
    qat_s2_lr: float = 1e-3  # Adam on S2's Cayley parameter (the paper does not give one)
    heal_steps: int = 0  # end-to-end healing of the factors on KL(dense || compressed) (:mod:`wsvd_passes.passes.heal`); 0: off
    # peak Adam rate on the factors, warmup + cosine (S2, where the recipe trains it, peaks at qat_s2_lr); None: HEAL_LR,
    # or HEAL_LR_ROTATED for rotating recipes
    heal_lr: float | None = None
    heal_batch: int = 2  # calibration windows per step
    heal_windows: int = 0  # text windows healing trains on, cut from the calibration text (0: the calibration windows)

    def __post_init__(self):
        if self.heal_lr is None:
            object.__setattr__(self, "heal_lr", HEAL_LR_ROTATED if self.rotate else HEAL_LR)


# Float recipes: 120 steps of one window at a peak of 2e-4, chosen on SmolLM2-135M's held-back validation KL
# (README, Fidelity: 0.1310 against 0.1351 for 60 x 2 at 3e-4 and 0.1355 for 60 x 2 at 1e-4, the same compute)
HEAL_STEPS, HEAL_BATCH, HEAL_LR = 120, 1, 2e-4
# on 192 windows of 256 tokens (SmolLM2, pydoc calibration half): on the 64 calibration windows the setting above
# drove the training loss to 0.077 against 0.131 on the held-back windows; on 192 (each seen once) to 0.118 vs 0.141
HEAL_WINDOWS = 192
# Rotating recipes: 30 steps of two windows (their healing step costs more: the quantisers, S2; 30 x 2 keeps
# `wsvd-heal` W8A8 within 5 minutes on 2 cores)
HEAL_STEPS_ROTATED, HEAL_BATCH_ROTATED = 30, 2
# A rotating recipe's down-projections carry the fused RMSNorm gain (D diag(gamma) S1; SmolLM2's gains average 0.3,
# 0.03 in layer 0), so Adam's per-element steps are that much larger relative to them: at HEAL_LR the W8A8 `wsvd`
# model's validation KL rose (0.231 -> 0.364 in 4 steps), at 1e-5 it fell (0.231 -> 0.202 in 10; README, Fidelity).
# 1e-5 is also the paper's rate for local QAT of the same fused factors.
HEAL_LR_ROTATED = 1e-5

RECIPES = {
    r.name: r
    for r in [
        Recipe("svd", "projection", "none", "uniform"),
        Recipe("asvd", "projection", "asvd", "uniform"),
        Recipe("svd-llm", "projection", "whiten", "uniform"),
        Recipe("qsvd-noq", "joint", "asvd", "importance"),
        Recipe("wsvd-noft", "head", "whiten", "importance"),
        Recipe("wsvd-noq", "head", "whiten", "importance", finetune=True),
        Recipe("rtn", "head", "none", "uniform", factor=False, quantize=True),
        Recipe("quarot", "head", "none", "uniform", factor=False, rotate=True, quantize=True),
        Recipe("qsvd", "joint", "asvd", "importance", rotate=True, quantize=True),
        Recipe("wsvd-noqat", "head", "whiten", "importance", finetune=True, rotate=True, quantize=True),
        Recipe("wsvd", "head", "whiten", "importance", finetune=True, rotate=True, quantize=True, qat=True),
        Recipe("wsvd-heal-noq", "head", "whiten", "importance", finetune=True, heal_steps=HEAL_STEPS,
               heal_batch=HEAL_BATCH, heal_windows=HEAL_WINDOWS),
        Recipe("wsvd-heal", "head", "whiten", "importance", finetune=True, rotate=True, quantize=True, qat=True,
               heal_steps=HEAL_STEPS_ROTATED, heal_batch=HEAL_BATCH_ROTATED),
    ]
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise WsvdError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    return RECIPES[name]
