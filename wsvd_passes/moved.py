"""Module paths from before the subpackages (``wsvd_passes.compress``, ``wsvd_passes.data``, ...) keep importing.

Each old path is an alias of the module at its new home (``sys.modules`` holds the same object under both names,
so attributes set through either are seen through both). A meta-path finder does it lazily, importing nothing
until an old path is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "capture": "graph.capture", "sites": "graph.sites", "residual": "graph.residual", "graph_utils": "graph.graph_utils",
    "pipeline": "graph.pipeline", "factor_spec": "graph.factor_spec", "quant_spec": "graph.quant_spec",
    "lowrank": "algorithms.lowrank", "rank_allocation": "algorithms.rank_allocation", "finetune": "algorithms.finetune",
    "quantize": "algorithms.quantize", "hadamard": "algorithms.hadamard", "rope": "algorithms.rope",
    "factorize": "passes.factorize", "rotate": "passes.rotate", "fake_quant": "passes.fake_quant", "qat": "passes.qat",
    "latent_kv": "passes.latent_kv", "heal": "passes.heal",
    "calibration": "compression.calibration", "compress": "compression.compress", "stream": "compression.stream",
    "recipes": "compression.recipes",
    "vlm": "models.vlm", "random_checkpoint": "models.random_checkpoint",
    "data": "eval.data", "mm_data": "eval.mm_data", "evaluation": "eval.evaluation",
    "multiple_choice": "eval.multiple_choice", "generation": "eval.generation",
    "artifact": "artifacts.artifact", "packing": "artifacts.packing", "report": "artifacts.report",
}
# ``wsvd_passes.models`` is now the package of model loading; it re-exports the old module's names (registry)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package: str):
        self.prefix = package + "."

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(self.prefix)
        if fullname.startswith(self.prefix) and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):  # the module at its new home, under the old name too
        return importlib.import_module(self.prefix + MOVED[spec.name.removeprefix(self.prefix)])

    def exec_module(self, module):
        pass


def install(package: str) -> None:
    """Resolve ``package.<old name>`` to its new module from now on (idempotent)."""
    if not any(isinstance(f, _Alias) and f.prefix == package + "." for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias(package))  # first: a stale file of an old name elsewhere must not win
