"""A plain-torch reference of the model vLLM serves from a ``wsvd export vllm`` directory.

It reads only the directory (config.json + model.safetensors) and computes, for one sequence, what
:mod:`wsvd_passes.serve.vllm_model` computes: embeddings, RMSNorm, the factored q/k/v of the recorded
granularity and widths (activation fake-quant per the config), rotate-half RoPE, causal GQA attention,
o_proj, SwiGLU MLP (online Hadamard before down_proj), LM head (the embedding when tied).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from wsvd_passes.algorithms.quantize import fake_quant_activation


def served_logits(directory, ids: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Logits [S, V] of token ids [S] under the served model, computed in ``dtype``."""
    cfg = json.loads((Path(directory) / "config.json").read_text())
    w = {k: v.to(dtype) for k, v in load_file(Path(directory) / "model.safetensors").items()}
    block = cfg["wsvd"]
    bits, D, granularity = block["activation_bits"], block["head_dim"], block["granularity"]
    heads = {"q": cfg["num_attention_heads"], "k": cfg["num_key_value_heads"], "v": cfg["num_key_value_heads"]}
    eps = cfg["rms_norm_eps"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))

    def fq(x, group=None):
        return fake_quant_activation(x, bits, group=group) if bits else x

    def rms(x, gamma):
        return gamma * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    S = ids.shape[0]
    angles = torch.arange(S, dtype=dtype)[:, None] / theta ** (torch.arange(0, D, 2, dtype=dtype) / D)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rope(x):  # [S, heads, D]
        return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

    h = w["model.embed_tokens.weight"][ids]
    causal = torch.full((S, S), float("-inf"), dtype=dtype).triu(1)
    for i, layer in enumerate(block["layers"]):
        a = f"model.layers.{i}."
        x = fq(rms(h, w[a + "input_layernorm.weight"]))
        qkv = {}
        for p, n in heads.items():
            c = x @ w[a + f"self_attn.{'qkv' if granularity == 'joint' else p}_down.weight"].T
            U = w[a + f"self_attn.{p}_up.weight"]
            if granularity == "head":
                r = layer[p]["width"]
                c = fq(c, r if n > 1 else None).view(S, n, r)
                y = torch.einsum("shr,hdr->shd", c, U.view(n, D, r)).reshape(S, n * D)
            else:
                y = fq(c) @ U.T
            if a + f"self_attn.{p}_up.bias" in w:
                y = y + w[a + f"self_attn.{p}_up.bias"]
            qkv[p] = y.view(S, n, D)
        q, k, v = rope(qkv["q"]), rope(qkv["k"]), qkv["v"]
        g = heads["q"] // heads["k"]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = torch.einsum("shd,thd->hst", q, k) * D**-0.5 + causal
        attn = torch.einsum("hst,thd->shd", scores.softmax(-1), v).reshape(S, -1)
        h = h + _linear(w, a + "self_attn.o_proj", fq(attn))
        x = fq(rms(h, w[a + "post_attention_layernorm.weight"]))
        m = torch.nn.functional.silu(_linear(w, a + "mlp.gate_proj", x)) * _linear(w, a + "mlp.up_proj", x)
        if block["online_hadamard"]:  # H = diag(signs) (K^T kron M1 kron M2), formed densely here
            f = [w[a + f"mlp.down_hadamard.{name}"].double() for name in ("signs", "k", "m1", "m2")]
            m = (m.double() @ (torch.diag(f[0]) @ torch.kron(f[1].T.contiguous(), torch.kron(f[2], f[3])))).to(m.dtype)
        h = h + _linear(w, a + "mlp.down_proj", fq(m))
    head = w["lm_head.weight"] if not cfg["tie_word_embeddings"] else w["model.embed_tokens.weight"]
    return rms(h, w["model.norm.weight"]) @ head.T


def _linear(w, name, x):
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y
