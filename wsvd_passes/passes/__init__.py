"""The graph passes, one per module, in recipe order: factorise Q/K/V, rotate (S1, V heads, online Hadamard),
local QAT (S2), fake-quantise, heal; and the latent-KV rewrite of a decode graph."""
