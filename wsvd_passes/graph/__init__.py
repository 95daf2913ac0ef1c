"""The captured graph and what is read off it: ``torch.export`` capture, attention sites, the residual stream,
the pass pipeline, graph-editing helpers, and the layouts passes record in node meta (factors, quantisers)."""
