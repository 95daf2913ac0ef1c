"""Lowering of compressed decode graphs to our ``torch.library`` ops and ``torch.compile``.

Planned here (issue 5): op registration, the pattern match of attention over the
latent cache, the compiled decode step and the generate loop.
"""
