"""Named compression recipes, after the methods they reproduce.

| recipe      | granularity | scaling         | ranks      | Fisher FT | reproduces                         |
|-------------|-------------|-----------------|------------|-----------|------------------------------------|
| svd         | projection  | none            | uniform    | no        | plain truncated SVD of W_q, W_k, W_v |
| asvd        | projection  | ASVD (alpha .5) | uniform    | no        | ASVD (Yuan et al. 2023)            |
| svd-llm     | projection  | whitening       | uniform    | no        | SVD-LLM (Wang et al. 2024)         |
| qsvd-noq    | joint       | ASVD (alpha .5) | importance | no        | QSVD without quantisation          |
| wsvd-noft   | head        | whitening       | importance | no        | WSVD-noFT                          |
| wsvd-noq    | head        | whitening       | importance | yes       | WSVD-noQ (Algorithm 1)             |

The baselines factor Q, K and V separately, as the WSVD paper does for them.
"""

from __future__ import annotations

import dataclasses

from .errors import WsvdError


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


RECIPES = {
    r.name: r
    for r in [
        Recipe("svd", "projection", "none", "uniform"),
        Recipe("asvd", "projection", "asvd", "uniform"),
        Recipe("svd-llm", "projection", "whiten", "uniform"),
        Recipe("qsvd-noq", "joint", "asvd", "importance"),
        Recipe("wsvd-noft", "head", "whiten", "importance"),
        Recipe("wsvd-noq", "head", "whiten", "importance", finetune=True),
    ]
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise WsvdError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    return RECIPES[name]
