"""`falcon-mamba serve` as a user runs it: a subprocess, an API key from the environment, and a
clean shutdown on Ctrl-C that finishes short requests and cancels long ones."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from falcon_mamba.cli import main
from tests.test_server import free_port, make_model_dir

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cli") / "tiny")


def test_user_errors_are_one_line(model_dir, capsys, tmp_path, monkeypatch):
    from falcon_mamba import default_model

    monkeypatch.setattr(default_model, "available", lambda: False)
    assert main(["serve"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch" in err and "Traceback" not in err
    assert main(["serve", "--model", str(model_dir), "--max-body", "lots"]) == 2
    assert "--max-body" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--prefix-cache-min-prompt", "-1"]) == 2
    assert "--prefix-cache-min-prompt must be at least 0" in capsys.readouterr().err


def test_serve_subprocess_api_key_env_and_clean_shutdown(model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The reference ops: this test is about the process, and they start fastest.
    env = {**os.environ, "FALCON_MAMBA_API_KEY": "k3y", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
           "FALCON_MAMBA_BACKEND": "reference"}
    proc = subprocess.Popen([sys.executable, "-m", "falcon_mamba", "serve", "--model", str(model_dir),
                             "--port", str(port), "--shutdown-grace", "3",
                             "--state-dtype", "bfloat16"],  # the flag reaches the pool (banner below)
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        auth = {"Authorization": "Bearer k3y"}
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        assert httpx.get(url + "/v1/models", headers=auth, timeout=5).json()["data"][0]["id"] == "tiny"

        long_body = {"model": "tiny", "prompt": "Go on", "max_tokens": 100000, "ignore_eos": True,
                     "stream": True}
        events = []
        first = threading.Event()

        def long_stream():
            with httpx.stream("POST", url + "/v1/completions", json=long_body, headers=auth,
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        first.set()

        t = threading.Thread(target=long_stream)
        t.start()
        assert first.wait(30)
        short = {}

        def short_request():
            short["r"] = httpx.post(url + "/v1/completions", headers=auth, timeout=60, json={
                "model": "tiny", "prompt": "Hi", "max_tokens": 10, "ignore_eos": True})

        def prompt_tokens():
            text = httpx.get(url + "/metrics", headers=auth, timeout=5).text
            return float(text.split("\nfalcon_mamba_prompt_tokens_total ")[1].split()[0])

        first_prompt = prompt_tokens()
        s = threading.Thread(target=short_request)
        s.start()
        deadline = time.monotonic() + 30
        while prompt_tokens() == first_prompt:  # until the short request has reached the engine
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        t.join(30)
        s.join(30)
        rc = proc.wait(30)
        out = proc.stdout.read()
        assert rc == 0, out
        assert "Traceback" not in out, out
        assert "bfloat16 SSM states" in out, out
        # The short request finished within the grace period...
        assert short["r"].status_code == 200, short["r"].text
        assert short["r"].json()["choices"][0]["finish_reason"] == "length"
        # ...the long one was cancelled with an error event, and its stream still ended properly.
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])
        assert "shutting down" in err["error"]["message"]
        assert len(events) > 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
