"""`llmfast serve` as a subprocess on 127.0.0.1 (it picks a free port itself and logs it), over a tiny random
checkpoint with a chat template, for the server tests (test_server*.py): constants, /health helpers, and the
fixtures' plugin (checkpoint, llm, server, client; each module that uses ``server`` starts one of its own)."""
import os
import re
import subprocess
import sys
import time

import pytest

from llmfast.engine import LLM

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

MODEL = "tiny-qwen3"
MAX_LEN = 1024
STARTUP_S = 90
PROMPTS = ["The quick brown fox", "Paged attention keeps keys", "A scheduler batches requests", "Héllo wörld",
           "Once upon a time", "Kernels fuse the residual add"]
GREEDY = dict(temperature=0, max_tokens=10, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from llmfast.demo import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), hidden_size=64, num_layers=2,
                                 max_position_embeddings=MAX_LEN)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint, device="cpu")


def _wait_until_serving(proc, log) -> str:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if match and httpx.get(match.group(1) + "/health", timeout=5).status_code == 200:
            return match.group(1)
        time.sleep(0.2)
    pytest.fail(f"the server did not start within {STARTUP_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The server's base URL; it is shut down after the module's tests, whatever happened."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "llmfast", "serve", "--model", str(checkpoint), "--host", "127.0.0.1",
               "--port", "0", "--served-model-name", MODEL,  # port 0: uvicorn's startup line names the port
               "--device", "cpu"]  # as the `llm` fixture it is compared with (on a GPU machine too)
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        yield _wait_until_serving(proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(server) -> dict:
    response = httpx.get(server + "/health", timeout=10)
    assert response.status_code == 200
    return response.json()


def wait_idle(server, aborted: int | None = None, timeout_s: float = 30) -> dict:
    """/health once nothing runs and every block is free (and ``aborted`` requests were aborted)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = health(server)
        idle = state["num_running_seqs"] == state["num_waiting_seqs"] == 0
        if idle and state["num_free_kv_blocks"] == state["num_kv_blocks"] and (
                aborted is None or state["num_aborted_requests"] >= aborted):
            return state
        assert time.monotonic() < deadline, f"the server did not settle: {state}"
        time.sleep(0.1)
