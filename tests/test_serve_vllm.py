"""Serving through vLLM: factored q/k/v, with the latent cache (phase 2: vLLM's pages hold the k/v latents) or
the dense one (phase 1: K and V rebuilt before vLLM's paged cache).

Marked ``vllm`` and skipped when vllm is not importable: run from the serving venv (``.ci/run``).
vLLM's greedy tokens must equal the artifact's own greedy decode (its replayed decode graph) with either cache,
the latent cache must hold as many more tokens as its pages are smaller (vLLM's own count), the latent backend
must equal a float64 reference, and ``vllm serve`` must answer an OpenAI chat completion on 127.0.0.1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from test_serve_export import make_artifact  # noqa: E402

from wsvd_passes.artifacts import artifact  # noqa: E402
from wsvd_passes.eval.generation import greedy_generate  # noqa: E402
from wsvd_passes.serve.export import export_vllm  # noqa: E402
from wsvd_passes.serve.format import SCALE_BYTES, latent_cache_scales  # noqa: E402
from wsvd_passes.serve.vllm_model import ATTENTION_MIN_HEAD_DIM  # noqa: E402

HERE = Path(__file__).parent
NEW = 16
PROMPTS = [[10, 20, 30, 40, 50], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111],
           [7, 300, 7, 300, 7, 300, 42]]


def vllm_run(directory, prompts: list[list[int]], new: int = NEW) -> dict:
    """vLLM's greedy run of ``directory``: {"TOKENS": new ids, "LOGPROBS": their log-probabilities,
    "KV_TOKENS": the engine's KV-cache capacity in tokens} (tests/vllm_greedy.py, VLLM_CPU_KVCACHE_SPACE=1)."""
    run = subprocess.run([sys.executable, str(HERE / "vllm_greedy.py"), str(directory), json.dumps(prompts), str(new)],
                         capture_output=True, text=True, timeout=900)
    found = dict(line.split(" ", 1) for line in run.stdout.splitlines()
                 if line.startswith(("TOKENS ", "LOGPROBS ", "KV_TOKENS ")))
    assert run.returncode == 0 and len(found) == 3, run.stderr[-3000:]
    return {key: json.loads(value) for key, value in found.items()}


def artifact_tokens(directory, prompts: list[list[int]], new: int = NEW) -> list[list[int]]:
    """Greedy continuation through the artifact's own decode graph (the passes replayed on it)."""
    longest = max(len(p) for p in prompts) + new
    decoder = artifact.load(directory, decode=True, max_cache_len=longest).captured
    return [greedy_generate(decoder, torch.tensor([p]), new)[0, len(p):].tolist() for p in prompts]


def cache_bytes_per_token(directory, value_bytes: int = 4) -> dict[str, int]:
    """Cache bytes per token over all layers of a served directory (float values of ``value_bytes``), from its
    recorded ranks: latent sum (sum_h r_k,h + sum_h r_v,h) values (a projection latent: r_k + r_v), or for
    quantised recipes as many int8 codes plus 4 bytes per scale (n_kv per per-head latent, 1 per projection);
    dense sum 2 n_kv D_attn values, D_attn the head size the dense path gives vLLM's CPU attention (D
    zero-padded to 32); unpadded sum 2 n_kv D values."""
    config = json.loads((Path(directory) / "config.json").read_text())
    block, kv_heads = config["wsvd"], config["num_key_value_heads"]
    layers = len(block["layers"])
    codes = sum(sum(layer[p]["ranks"]) for layer in block["layers"] for p in ("k", "v"))
    scales = sum(sum(latent_cache_scales(block, i).values()) for i in range(layers))
    return {"latent": codes + SCALE_BYTES * scales if scales else codes * value_bytes,
            "dense": 2 * kv_heads * max(block["head_dim"], ATTENTION_MIN_HEAD_DIM) * layers * value_bytes,
            "unpadded": 2 * kv_heads * block["head_dim"] * layers * value_bytes}


@pytest.mark.parametrize("model,recipe,bits", [("tiny-llama-gqa", "wsvd-noq", "w16a16"), ("tiny-llama-gqa", "wsvd", "w8a8"),
                                               ("tiny-qwen2", "svd-llm", "w16a16")])
def test_vllm_greedy_tokens_equal_the_artifacts(tmp_path, model, recipe, bits):
    """Latent (the default) and dense caches: the artifact's greedy tokens; float recipes: the same log-probabilities
    (the caches differ in rounding only); the latent cache holds (dense / latent bytes per token) times the tokens
    (W8A8: int8 latents and their scales). Per-head factors cache a latent per kv head; svd-llm's per-projection
    latents (with q/k/v biases) one for all."""
    make_artifact(tmp_path / "art", model, recipe, bits)
    expected = artifact_tokens(tmp_path / "art", PROMPTS)
    runs, blocks = {}, {}
    for kv_cache in ("latent", "dense"):
        blocks[kv_cache] = export_vllm(tmp_path / "art", tmp_path / kv_cache, None if kv_cache == "latent" else "dense")
        assert blocks[kv_cache]["kv_cache"] == kv_cache
        runs[kv_cache] = vllm_run(tmp_path / kv_cache, PROMPTS)
        assert runs[kv_cache]["TOKENS"] == expected, kv_cache
    if bits == "w16a16":
        got, want = (torch.tensor(runs[k]["LOGPROBS"]) for k in ("latent", "dense"))
        assert (got - want).abs().max() <= 1e-4
    per_token = cache_bytes_per_token(tmp_path / "latent")
    capacity = {k: runs[k]["KV_TOKENS"] for k in runs}
    print(f"\n{model} {recipe} {bits}: vLLM KV-cache capacity (VLLM_CPU_KVCACHE_SPACE=1) latent {capacity['latent']:,} tokens, "
          f"dense {capacity['dense']:,} tokens: x{capacity['latent'] / capacity['dense']:.3f}; cache bytes per token "
          f"latent {per_token['latent']}, dense {per_token['dense']} (unpadded {per_token['unpadded']}: "
          f"x{per_token['unpadded'] / per_token['latent']:.3f}; rho2 {blocks['latent']['rho2']})")
    assert capacity["latent"] / capacity["dense"] == pytest.approx(per_token["dense"] / per_token["latent"], rel=0.01)


@pytest.mark.parametrize("through_op", [False, True], ids=["rebuild", "op"])
def test_latent_backend_equals_the_float64_reference(through_op):
    """The latent backend over a paged cache (a prefill, a decode, and a 3-token chunk after 6 cached tokens; blocks
    shuffled, unwritten slots NaN) equals wsvd_kernels' float64 latent decode reference, query by query, for
    per-head latents of unequal ranks: the pages hold the packed real channels (garbage in the padding is dropped).
    ``op``: the decode goes through ``wsvd::paged_latent_attention`` on the cache itself and the block table (vLLM's
    WsvdAttention with no k bias; entries located by ``format.latent_cache_heads``), and under TRITON_INTERPRET=1 the
    paged Triton kernel on the same pages gives the same attention."""
    from wsvd_kernels.reference import latent_decode_attention_reference, rotate_half
    from wsvd_passes.algorithms.rope import rope_half_tables
    from wsvd_passes.serve.format import latent_cache_heads, latent_cache_layout
    from wsvd_passes.serve.latent_cache import LatentMetadata, WsvdLatentImpl, latent_decode, pack_latent, unpack_latent

    g = torch.Generator().manual_seed(0)
    n_q, n_kv, D, block = 6, 2, 16, 4
    ranks = {"k": [5, 2], "v": [3, 7]}
    block_info = {"granularity": "head", "layers": [{p: {"ranks": r, "width": max(r)} for p, r in ranks.items()}]}
    layout = latent_cache_layout(block_info, 0)
    heads = torch.tensor(latent_cache_heads(block_info, 0, n_kv), dtype=torch.int32)
    (w_k, w_v), (m_k, m_v) = (max(r) for r in ranks.values()), (layout[p][1] for p in ranks)
    channels = {p: torch.tensor(layout[p][0]) for p in ranks}
    up = {}
    for p, w in (("k", w_k), ("v", w_v)):  # U_h [w, D] with zero rows beyond r_h, as the padded factors hold
        up[p] = torch.randn(n_kv, w, D, generator=g) * (torch.arange(w)[:, None] < torch.tensor(ranks[p])[:, None, None])
    bk, bv = up["k"], up["v"]
    cos, sin = rope_half_tables(1.0 / 10000 ** (torch.arange(0, D, 2) / D), 64)
    lengths, new = [7, 10, 9], [7, 1, 3]
    tables = torch.randperm(12, generator=g).view(3, 4)
    ck = [100 * torch.randn(n, n_kv, w_k, generator=g) for n in lengths]  # the padding holds garbage U ignores
    cv = [100 * torch.randn(n, n_kv, w_v, generator=g) for n in lengths]

    def pack(c, p):  # [.., n_kv, w] -> [.., m_p]
        return pack_latent(c.flatten(-2), channels[p], layout[p][1])

    q = torch.randn(sum(new), n_q, D, generator=g)
    cache = torch.full((12, 1, block, m_k + m_v), float("nan"))
    slots = []
    for b, (n, s) in enumerate(zip(lengths, new)):
        for j in range(n):
            slot = int(tables[b, j // block]) * block + j % block
            if j < n - s:  # cached by earlier steps
                cache[slot // block, 0, slot % block] = torch.cat([pack(ck[b][j], "k"), pack(cv[b][j], "v")])
            else:
                slots.append(slot)
    starts = [0, *torch.tensor(new).cumsum(0).tolist()]

    def rebuild(c_k, c_v, positions):  # unpacked latents, per-head up-projections, rotate-half RoPE: rebuild_kv's math
        k, v = (torch.einsum("lhr,hrd->lhd", unpack_latent(c, channels[p], n_kv * w).unflatten(1, (n_kv, w)), up[p])
                for p, c, w in (("k", c_k, w_k), ("v", c_v, w_v)))
        cos_j, sin_j = (torch.cat([t[positions]] * 2, dim=-1)[:, None] for t in (cos, sin))
        return (k * cos_j + rotate_half(k) * sin_j).flatten(1), v.flatten(1)

    key = pack(torch.cat([c[n - s:] for c, n, s in zip(ck, lengths, new)]), "k")[:, None]
    value = pack(torch.cat([c[n - s:] for c, n, s in zip(cv, lengths, new)]), "v")[:, None]
    out = torch.zeros(sum(new), n_q, D)
    metadata = LatentMetadata(sum(new), starts, lengths, tables, torch.tensor(slots))
    decoded = []

    def decode(q, pages, table, lengths, max_len):  # WsvdAttention.decode_latent's math
        decoded.append((q, pages, table, lengths, max_len))
        return latent_decode(q, pages, table, lengths, max_len, heads, bk.transpose(1, 2), bv.transpose(1, 2), None,
                             cos, sin, D**-0.5)

    layer = SimpleNamespace(rebuild=rebuild, decode=decode if through_op else None)
    WsvdLatentImpl(n_q, D, D**-0.5, n_kv).forward(layer, q, key, value, cache, metadata, out)
    assert len(decoded) == through_op  # one batch of decode requests (request 1)
    if decoded:
        step_q, pages, table, step_lengths, max_len = decoded[0]
        assert pages.data_ptr() == cache.data_ptr() and table.tolist() == tables[1:2, :3].tolist()  # no gather
    if decoded and os.environ.get("TRITON_INTERPRET") == "1":
        from wsvd_kernels.latent_attention import paged_latent_decode_attention_triton
        from wsvd_kernels.reference import paged_latent_decode_attention_torch

        args = (step_q, pages, table, step_lengths, bk, heads, cos, sin)
        kwargs = {"max_len": max_len, "width_v": w_v, "scale": D**-0.5}
        torch.testing.assert_close(paged_latent_decode_attention_triton(*args, **kwargs),
                                   paged_latent_decode_attention_torch(*args, **kwargs), rtol=1e-4, atol=1e-4)
    group = n_q // n_kv
    for b, (n, s) in enumerate(zip(lengths, new)):
        for i in range(s):
            position, t = n - s + i, starts[b] + i
            latent = latent_decode_attention_reference(
                q[t][None], ck[b][:position + 1].transpose(0, 1)[None], bk, cv[b][:position + 1].transpose(0, 1)[None],
                torch.tensor([position + 1]), cos, sin, scale=D**-0.5)[0]  # [n_q, w_v]
            expected = torch.einsum("hgr,hrd->hgd", latent.view(n_kv, group, w_v), bv.double()).reshape(n_q, D)
            assert (out[t].double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("bits,group", [(8, 5), (8, None), (4, 5)])
def test_int8_cache_entries_hold_the_quantised_latent(bits, group):
    """An int8 entry (codes of the kept channels, then float32 scales) decodes to the very latent the
    up-projection reads (the activation quantiser's output, bit for bit), for 3 heads of width 5 with ranks
    [5, 2, 4] (zero padding), per head or one group over all."""
    from wsvd_passes.algorithms.quantize import fake_quant_activation
    from wsvd_passes.serve.latent_cache import int8_entry, int8_latent

    ranks, w = [5, 2, 4], 5
    channels = torch.tensor([h * w + j for h, r in enumerate(ranks) for j in range(r)])
    keep = torch.zeros(len(ranks) * w, dtype=torch.bool).index_fill_(0, channels, True)
    c = (torch.randn(9, len(ranks) * w, generator=torch.Generator().manual_seed(bits)) * 3).bfloat16() * keep
    entry = int8_entry(c, bits, group, channels, sum(ranks) + 1)  # one column to spare, as a tp rank may have
    groups = 1 if group is None else len(ranks)
    assert entry.dtype == torch.int8 and entry.shape == (9, sum(ranks) + 1 + SCALE_BYTES * groups)
    got = int8_latent(entry, channels, sum(ranks) + 1, len(ranks) * w, torch.bfloat16)
    assert torch.equal(got, fake_quant_activation(c, bits, group=group))
    assert entry[:, :sum(ranks) + 1].abs().max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("granularity", ["head", "projection"])
def test_int8_cache_entries_are_read_at_latent_cache_heads(granularity):
    """The paged kernel's view of an int8 entry [codes_k | scales_k | codes_v | scales_v]
    (``format.latent_cache_heads``: each kv head's columns, rank and scale bytes) gives back, per head, the quantised
    latent the up-projection reads: 3 heads of width 5 with k ranks [5, 2, 4], v ranks [3, 5, 1], or one projection
    latent of width 7."""
    from wsvd_kernels.reference import gather_pages
    from wsvd_passes.algorithms.quantize import fake_quant_activation
    from wsvd_passes.serve.format import latent_cache_heads, latent_cache_layout
    from wsvd_passes.serve.latent_cache import int8_entry

    n_kv, tokens = 3, 6
    ranks = {"k": [5, 2, 4], "v": [3, 5, 1]} if granularity == "head" else {"k": [7], "v": [7]}
    block = {"granularity": granularity, "activation_bits": 8,
             "layers": [{p: {"ranks": r, "width": max(r)} for p, r in ranks.items()}]}
    layout = latent_cache_layout(block, 0)
    gen = torch.Generator().manual_seed(0)
    entries, expected = [], {}
    for p, r in ranks.items():
        w, (channels, width) = max(r), layout[p]
        keep = torch.zeros(len(r) * w, dtype=torch.bool).index_fill_(0, torch.tensor(channels), True)
        c = torch.randn(tokens, len(r) * w, generator=gen) * keep
        group = w if granularity == "head" else None
        entries.append(int8_entry(c, 8, group, torch.tensor(channels), width))
        expected[p] = fake_quant_activation(c, 8, group=group).view(tokens, -1, w).expand(tokens, n_kv, w)
    cache = torch.cat(entries, -1)[:, None]  # pages of one token
    heads = torch.tensor(latent_cache_heads(block, 0, n_kv), dtype=torch.int32)
    ck, ck_scale, cv, cv_scale = gather_pages(cache, torch.arange(tokens)[None], heads, tokens, max(ranks["k"]),
                                              max(ranks["v"]))
    for p, c, c_scale in (("k", ck, ck_scale), ("v", cv, cv_scale)):
        torch.testing.assert_close((c.float() * c_scale[..., None])[0].transpose(0, 1), expected[p], rtol=0, atol=0)


@pytest.mark.parametrize("directory", [d for d in os.environ.get("WSVD_SERVE_ARTIFACTS", "").split(",") if d])
def test_vllm_greedy_tokens_equal_given_artifacts(tmp_path, directory):
    """Artifacts too slow to compress here (SmolLM2): WSVD_SERVE_ARTIFACTS=DIR1,DIR2 pytest -m vllm ..."""
    from transformers import AutoTokenizer

    block = export_vllm(directory, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")  # the exported tokenizer, what vLLM would use
    prompts = [tokenizer(t).input_ids for t in ("The capital of France is", "def fibonacci(n):",
                                                 "Water boils at a temperature of")]
    run = vllm_run(tmp_path / "out", prompts)
    print(f"\n{directory}: {block['kv_cache']} cache, vLLM KV-cache capacity {run['KV_TOKENS']:,} tokens")
    assert run["TOKENS"] == artifact_tokens(directory, prompts)


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def test_vllm_serve_answers_a_chat_completion(tmp_path):
    make_artifact(tmp_path / "art", "tiny-llama-gqa", "wsvd-noq")
    assert export_vllm(tmp_path / "art", tmp_path / "out")["kv_cache"] == "latent"  # the server reads the latent cache
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `vllm serve OUT` runs this server; vllm-cpu 0.32.0's `vllm` command dies at start looking up the version of
    # a distribution named "vllm" (it is installed as "vllm-cpu"), so the test starts the server module itself
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path / "out"), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
         "--served-model-name", "wsvd-tiny", "--chat-template", str(tmp_path / "chat.jinja")],
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"),
        start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not come up in 600 s"
                time.sleep(2)
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "wsvd-tiny", "messages": [{"role": "user", "content": "Hello"}],
                             "max_tokens": 8, "temperature": 0}).encode())
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert reply["object"] == "chat.completion" and 1 <= reply["usage"]["completion_tokens"] <= 8
        assert isinstance(reply["choices"][0]["message"]["content"], str)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert server.returncode is not None
