"""The shipped chat-completions server, on loopback: protocol, errors, auth, and CAPO training through it."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from creditrl.configure import load_config
from creditrl.critics import OpenAICompatibleCritic
from creditrl.critics.server import ChatCompletionsServer
from creditrl.policy.loading import load_policy
from creditrl.trainer import Trainer

PROXIES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture()
def server(tiny_lab_model_dir, monkeypatch):
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    srv = ChatCompletionsServer(load_policy(str(tiny_lab_model_dir)), "tiny-lab", port=0, max_tokens_cap=16).start()
    yield srv
    srv.stop()


def post(url, body, headers=None):
    """(status, parsed JSON reply) of a POST to url."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def ask(n=1, seed=0, **extra):
    return {"model": "tiny-lab", "messages": [{"role": "user", "content": "Start 7. Add 5."}],
            "temperature": 1.0, "max_tokens": 8, "n": n, "seed": seed, **extra}


def test_a_completion_follows_the_protocol(server):
    status, reply = post(server.url + "/chat/completions", ask(n=3))
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == "tiny-lab"
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
               for c in reply["choices"])
    assert all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len("Start 7. Add 5.\n")  # the lab tokenizer: one id per character
    assert 1 <= usage["completion_tokens"] <= 3 * 8 and usage["total_tokens"] == (
        usage["prompt_tokens"] + usage["completion_tokens"])
    with urllib.request.urlopen(server.url + "/models", timeout=10) as models:
        assert [m["id"] for m in json.loads(models.read())["data"]] == ["tiny-lab"]


def test_a_seeded_request_is_reproducible(server):
    first = post(server.url + "/chat/completions", ask(n=2, seed=5))[1]["choices"]
    again = post(server.url + "/chat/completions", ask(n=2, seed=5))[1]["choices"]
    assert [c["message"] for c in first] == [c["message"] for c in again]


@pytest.mark.parametrize("body,field", [
    (b"{not json", "not JSON"),
    ({"model": "m"}, "'messages'"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    (ask(temperature="hot"), "'temperature'"),
    (ask(max_tokens=10_000), "'max_tokens'"),
    (ask(n=0), "'n'"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field):
    status, reply = post(server.url + "/chat/completions", body)
    assert status == 400 and field in reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"


def test_unseeded_requests_sample_afresh(server):
    """The client sends no seed: a prompt's k critiques must not all be the same sample."""
    body = ask(max_tokens=16)
    del body["seed"]
    texts = {post(server.url + "/chat/completions", body)[1]["choices"][0]["message"]["content"] for _ in range(4)}
    assert len(texts) > 1


@pytest.mark.parametrize("length", ["abc", "-1", None])
def test_a_bad_content_length_gets_an_error_reply_not_a_hang(server, length):
    import http.client
    from urllib.parse import urlparse

    where = urlparse(server.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    connection.putrequest("POST", "/v1/chat/completions")
    if length is not None:
        connection.putheader("Content-Length", length)
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == (411 if length is None else 400)
    assert "Content-Length" in json.loads(reply.read())["error"]["message"]
    connection.close()


def test_unknown_routes_get_404(server):
    assert post(server.url + "/completions", ask())[0] == 404


def test_an_api_key_is_required_when_configured(tiny_lab_model_dir, monkeypatch):
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SERVE_KEY", "s3cret")
    srv = ChatCompletionsServer(load_policy(str(tiny_lab_model_dir)), "tiny-lab", port=0, max_tokens_cap=8,
                                api_key_env="SERVE_KEY").start()
    try:
        assert post(srv.url + "/chat/completions", ask())[0] == 401
        assert post(srv.url + "/chat/completions", ask(), {"Authorization": "Bearer wrong"})[0] == 401
        assert post(srv.url + "/chat/completions", ask(), {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        srv.stop()


def test_the_openai_critic_client_talks_to_it(server):
    critic = OpenAICompatibleCritic(server.url, "tiny-lab", api_key_env="UNSET_KEY", max_tokens=8, timeout_s=30)
    texts = critic.critique(["Start 7. Add 5.", "Start 3. Times 2."], k=2, seed=0)
    assert [len(row) for row in texts] == [2, 2] and all(isinstance(t, str) for row in texts for t in row)
    assert (critic.stats.requests, critic.stats.failures) == (4, 0) and server.requests_served == 4


def test_capo_trains_through_the_server(server, tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", "method=capo", "train.steps=1",
                             "rollout.prompts_per_step=2", "rollout.group_size=2", "task.lab.train_size=8",
                             "task.lab.eval_size=2", "eval.k=1", "eval.before=false", "sampling.max_new_tokens=16",
                             "method_params.k=2", "critic.backend=openai", f"critic.base_url={server.url}",
                             "critic.model=tiny-lab", "critic.max_tokens=8", "critic.timeout_s=30"])
    Trainer(cfg, show_progress=False).train()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["critic_failures"] == 0 and metrics["critic_requests"] == server.requests_served > 0


@pytest.mark.slow
def test_the_serve_command_starts_a_server(tiny_lab_model_dir):
    env = {k: v for k, v in os.environ.items() if k not in PROXIES}
    proc = subprocess.Popen([sys.executable, "-m", "creditrl", "critic", "serve", "--model", str(tiny_lab_model_dir),
                             "--port", "0", "--max-tokens", "8", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line, seen = "", []
        while "serving" not in line:
            line = proc.stdout.readline()
            seen.append(line)
            assert line or proc.poll() is None, f"the server exited before serving: {''.join(seen)}"
        url = line.split(" at ")[1].split("/chat/completions")[0]
        status, reply = post(url + "/chat/completions", ask())
        assert status == 200 and len(reply["choices"]) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
