"""Compression end to end: calibration (statistics, gradients), the recipes, the whole-model run and the streamed
(layer by layer) run that compose the passes."""
