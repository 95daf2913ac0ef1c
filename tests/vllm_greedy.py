"""Greedy tokens from vLLM for a ``wsvd export vllm`` directory (run as a script: vLLM spawns its engine).

    python tests/vllm_greedy.py OUT '[[ids...], ...]' NEW_TOKENS   -> prints TOKENS [[new ids...], ...],
        LOGPROBS [[log-probability of each new id...], ...] and KV_TOKENS n (vLLM's KV-cache capacity in tokens)

In float32 and eager mode; WSVD_VLLM_DTYPE=bfloat16 and WSVD_VLLM_EAGER=0 (vLLM's torch.compile) change them.
"""

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    from vllm import LLM, SamplingParams

    directory, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=directory, dtype=os.environ.get("WSVD_VLLM_DTYPE", "float32"), max_model_len=256,
              enforce_eager=os.environ.get("WSVD_VLLM_EAGER", "1") == "1", skip_tokenizer_init=True, seed=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False,
                                          logprobs=0))
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)
    print("LOGPROBS " + json.dumps([[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                    for o in outputs]), flush=True)
    print(f"KV_TOKENS {llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens}", flush=True)


if __name__ == "__main__":
    main()
