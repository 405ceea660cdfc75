"""CAPO: the critic prompt and parser, voting, the token reward, the HTTP critic, and a lab run."""

import json
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from factories import make_rollouts

from creditrl.config import ConfigError, save_config
from creditrl.configure import load_config
from creditrl.critics import (
    CriticStats,
    OpenAICompatibleCritic,
    StepCritic,
    TransformersCritic,
    build_critic,
    build_prompt,
    parse_wrong_steps,
    step_texts,
)
from creditrl.methods import compute_advantages
from creditrl.methods.capo import CAPOParams, step_penalties
from creditrl.tasks.base import Problem
from creditrl.tasks.lab import judge, parse_question
from creditrl.trainer import Trainer

# ---- (1) the parser -----------------------------------------------------------------------------

PARSED = [
    ("Step 2 is off by one.\nWrong steps: [1, 3]", {0, 2}),
    ("wrong steps: 1,3", {0, 2}),
    ("All fine.\nWrong steps: []", set()),
    ("Wrong steps: none", set()),
    ("Wrong steps: None.", set()),
    ("Wrong steps: N/A", set()),
    ("There are no wrong steps.", set()),
    ("**Wrong steps:** [2]", {1}),
    ("**Wrong steps**: [2, 4]", {1, 3}),
    ("### Wrong steps\n`[4]`", {3}),
    ("Wrong step: 3", {2}),
    ("The wrong steps are: 2 and 4", {1, 3}),
    ("Wrong steps: Step 2, Step 5", {1, 4}),
    ("Wrong steps: 2-4", {1, 2, 3}),
    ("Wrong steps: 4 to 2", {1, 2, 3}),
    ("Wrong steps: [1, 3]. Step 1 adds 5 instead of 6.", {0, 2}),
    ("Wrong steps: 2 (the product 3*4 is 12, not 13)", {1}),
    ("Wrong steps: [\"1\", \"2\"]", {0, 1}),
    ("Wrong steps: [1, 3", {0, 2}),
    ("Wrong steps: [1,]", {0}),
    ("Wrong steps (1-based): [2]", {1}),
    ("wrong steps = [5]", {4}),
    ("WRONG STEPS:\n[2]", {1}),
    ("Wrong steps: [1, 99]", {0}),  # out of range: dropped
    ("Wrong steps: [0, 6, 7]", None),  # only out-of-range numbers: no verdict (not "all steps right")
    ("Wrong steps: 99999999999999999999", None),
    ("Wrong steps:\n- Step 2\n- Step 4", {1, 3}),  # a bulleted list below the marker
    ("Wrong steps: - Step 3", {2}),
    ("Wrong steps:\n1. Step 3 (arithmetic)\n2. Step 5\nThe rest is right.", {2, 4}),  # a numbered one
    ("Wrong steps: -", set()),
    ("Wrong steps: [2, 3]\nIn summary there are no wrong steps besides these.", {1, 2}),  # a list beats a phrase
    ("<think>Maybe wrong steps: [2]. No, wait.</think>\nStep 3 is wrong.\nWrong steps: [3]", {2}),
    ("<think>hmm, wrong steps: 2? let me check", None),  # cut off while thinking
    ("Wrong steps: [2]\n...on second thought, Wrong steps: [3]", {2}),  # the last verdict counts
    ("Wrong steps: [3]\nI listed the wrong steps: above", {2}),  # a later marker without a list is skipped
    ("Analysis ...\n[2, 3]", {1, 2}),  # a bare list as the last line
    ("Analysis ...\n[]", set()),
    ("", None),
    (None, None),
    ("The solution looks fine to me.", None),
    ("Wrong steps: maybe the second?", None),
    ("Wrong steps: [a, b]", None),
    ("Wrong steps: [i, j]", None),  # the template copied verbatim
    ("The answer is [2] or [3] ... hmm\nnot sure", None),
    ("Wrong steps:", None),
    ("wrong steps " * 5000, None),
]


@pytest.mark.parametrize("text,expected", PARSED, ids=[repr(t)[:40] for t, _ in PARSED])
def test_the_parser_reads_tolerantly_and_never_raises(text, expected):
    assert parse_wrong_steps(text, 5) == expected


def test_the_parser_is_fast_on_hostile_input():
    start = time.perf_counter()
    for text in ["Wrong steps: [" + "1 " * 5000 + "x]", "Wrong steps: " + "1" * 100_000, "[" + " 1" * 20_000 + " x",
                 "wrong steps: 1 " * 20_000, "\n" * 50_000 + "Wrong steps"]:
        parse_wrong_steps(text, 5)
    assert time.perf_counter() - start < 2.0


# ---- (2) the prompt: steps exactly as step_ids cut them ----------------------------------------

def test_step_texts_follow_step_ids_and_tile_the_response(tiny_policy):
    text = "7+5=12\n12*3=37\nAnswer: 37"
    ids = tiny_policy.tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_policy.tokenizer.eos_token_id]
    steps = [0] * 7 + [1] * 8 + [2] * 10 + [2]  # the eos token joins the last step
    assert step_texts(ids, steps, tiny_policy.decode) == ["7+5=12\n", "12*3=37\n", "Answer: 37"]
    # a cut that is not at a line end is kept as it is: the prompt shows step_ids' steps, not a re-split
    assert step_texts(ids, [0] * 3 + [1] * 23, tiny_policy.decode) == ["7+5", "=12\n12*3=37\nAnswer: 37"]
    # a multi-character token: each step is cut where its last token's decode ends
    vocab = {1: "ab", 2: "c\n", 3: "de", 4: "f"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    assert step_texts([1, 2, 3, 4], [0, 0, 1, 1], decode) == ["abc\n", "def"]
    assert step_texts([1, 2, 3, 4], [0, 0, 2, 2], decode) == ["abc\n", "", "def"]  # step 1 owns no token


def test_the_prompt_numbers_the_steps_from_one():
    prompt = build_prompt("Start 7. Add 5. Times 3.", "36", ["7+5=12\n", "12*3=37\n", "Answer: 37"])
    assert "Start 7. Add 5. Times 3." in prompt and "Reference answer:\n36" in prompt
    assert "Step 1: 7+5=12\nStep 2: 12*3=37\nStep 3: Answer: 37\n" in prompt
    assert prompt.rstrip().endswith("Wrong steps: []")
    assert parse_wrong_steps(prompt, 3) == set()  # its own example is a well-formed (empty) verdict


# ---- (3) voting and the token reward by hand ---------------------------------------------------

@pytest.mark.parametrize("voting,expected", [
    ("intersection", [1.0, 0.0, 0.0, 0.0]),
    ("majority", [1.0, 1.0, 0.0, 0.0]),  # c_j > m/2 = 1.5
    ("union", [1.0, 1.0, 1.0, 0.0]),
    ("average", [1.0, 2 / 3, 1 / 3, 0.0]),
])
def test_voting_by_hand(voting, expected):
    # k = 4 critiques, one without a verdict: m = 3 vote; counts c = [3, 2, 1, 0]; step index 9 is out of range
    verdicts = [{0, 1}, {0, 1, 2, 9}, None, {0}]
    assert step_penalties(verdicts, 4, voting).tolist() == pytest.approx(expected)
    assert step_penalties([None, None, None, None], 4, voting).tolist() == [0.0] * 4  # all failed: nothing flagged
    assert step_penalties([set(), set()], 4, voting).tolist() == [0.0] * 4


class FixedVerdicts:
    """A StepCritic stand-in returning given verdicts (B lists of k)."""

    def __init__(self, verdicts):
        self.verdicts, self.asked = verdicts, []

    def wrong_steps(self, rollouts, k):
        self.asked.append(k)
        return self.verdicts


def _hand_batch():
    # group 0: row 0 right, steps [0, 0, 1]; row 1 wrong, steps [0, 1].  group 1: rows 2, 3 right, one step.
    return make_rollouts(rewards=[1.0, 0.0, 1.0, 1.0], group_ids=[0, 0, 1, 1], lengths=[3, 2, 2, 1],
                         step_ids=[[0, 0, 1, -1], [0, 1, -1, -1], [0, 0, -1, -1], [0, -1, -1, -1]])


def test_token_reward_and_group_normalisation_by_hand():
    # verdicts (k = 2): row 0 step 1 flagged by both; row 1 step 0 by both (step 1 by one: not in the intersection)
    critic = FixedVerdicts([[{1}, {1}], [{0}, {0, 1}], [set(), None], [None, None]])
    adv = compute_advantages("capo", _hand_batch(), {"k": 2}, critic=critic)
    assert critic.asked == [2]
    # R = 2·r_v − 1·flag: row 0 [2, 2, 1], row 1 [−1, 0]; group 0 tokens [2, 2, 1, −1, 0]: mean 0.8,
    # centred [1.2, 1.2, 0.2, −1.8, −0.8], Σ² = 6.8, unbiased var 6.8/4 = 1.7, std √1.7 = 1.30384;
    # group 1 tokens [2, 2, 2] all equal: 0.
    std = math.sqrt(1.7)
    expected = torch.tensor([[1.2 / std, 1.2 / std, 0.2 / std, 0.0], [-1.8 / std, -0.8 / std, 0.0, 0.0],
                             [0.0] * 4, [0.0] * 4])
    assert torch.allclose(adv, expected, atol=1e-5)
    centred = compute_advantages("capo", _hand_batch(), {"k": 2, "std_normalize": False}, critic=critic)
    assert torch.allclose(centred[:2], torch.tensor([[1.2, 1.2, 0.2, 0.0], [-1.8, -0.8, 0.0, 0.0]]), atol=1e-6)
    # union flags row 1's step 1 too: row 1 [−1, −1]; tokens [2, 2, 1, −1, −1], mean 0.6,
    # centred [1.4, 1.4, 0.4, −1.6, −1.6]
    union = compute_advantages("capo", _hand_batch(), {"k": 2, "voting": "union", "std_normalize": False},
                               critic=critic)
    assert torch.allclose(union[:2], torch.tensor([[1.4, 1.4, 0.4, 0.0], [-1.6, -1.6, 0.0, 0.0]]), atol=1e-6)
    # W_process = 0 leaves the verifier alone: token-normalised outcome reward, same sign on every token of a row
    outcome = compute_advantages("capo", _hand_batch(), {"k": 2, "w_process": 0.0}, critic=critic)
    assert (outcome[0, :3] > 0).all() and (outcome[1, :2] < 0).all()


def test_a_wrong_step_inside_a_right_solution_beats_a_right_step_inside_a_wrong_one():
    critic = FixedVerdicts([[{0}] * 4, [set()] * 4])
    batch = make_rollouts(rewards=[1.0, 0.0], group_ids=[0, 0], lengths=[2, 2], step_ids=[[0, 1], [0, 1]])
    adv = compute_advantages("capo", batch, {}, critic=critic)
    assert adv[0, 0] > adv[1, 0] and adv[0, 0] < adv[0, 1]


def test_a_response_no_critique_judged_gains_nothing_over_its_judged_siblings():
    """Both right; row 0's step 0 is flagged, row 1's critiques all failed.  Penalising row 0 alone would
    rank row 1 above it for the critic's failure: the group is credited on the verdict only (all equal)."""
    batch = make_rollouts(rewards=[1.0, 1.0, 1.0, 0.0], group_ids=[0, 0, 1, 1], lengths=[2, 2, 2, 2],
                          step_ids=[[0, 1]] * 4)
    critic = FixedVerdicts([[{0}] * 2, [None] * 2, [{0}] * 2, [set()] * 2])
    adv = compute_advantages("capo", batch, {"k": 2, "std_normalize": False}, critic=critic)
    assert torch.equal(adv[:2], torch.zeros(2, 2))
    # the fully judged group keeps its step penalty: R = [1, 2] and [0, 0], mean 0.75
    assert torch.allclose(adv[2:], torch.tensor([[0.25, 1.25], [-0.75, -0.75]]))


def test_capo_without_a_critic_says_what_is_missing():
    with pytest.raises(ValueError, match="needs critic"):
        compute_advantages("capo", _hand_batch(), {})


def test_defaults_are_the_published_ones():
    cfg = load_config(None, ["method=capo"])
    assert cfg.method_params == CAPOParams().model_dump()
    assert (cfg.method_params["k"], cfg.method_params["voting"]) == (4, "intersection")
    assert (cfg.method_params["w_whole"], cfg.method_params["w_process"]) == (2.0, 1.0)
    assert cfg.critic.backend == "oracle" and cfg.critic.api_key_env == "OPENAI_API_KEY"


# ---- (4) StepCritic: prompts, de-duplication, counters -----------------------------------------

class Scripted:
    """A backend that answers every critique with `script(prompt, index)`."""

    def __init__(self, script):
        self.script, self.stats, self.prompts = script, CriticStats(), []

    def critique(self, prompts, k, seed):
        self.prompts.append(list(prompts))
        self.stats.calls += len(prompts) * k
        return [[self.script(p, i) for i in range(k)] for p in prompts]


def _text_batch(policy, texts, steps, group_ids):
    """Rollouts whose responses are `texts` (lab tokens, one per character) cut by `steps` (per-token step ids)."""
    rows = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = make_rollouts(rewards=[1.0] * len(texts), group_ids=group_ids, lengths=[len(r) for r in rows],
                          step_ids=[s + [-1] * (max(map(len, rows)) - len(s)) for s in steps])
    for b, r in enumerate(rows):
        batch.response_ids[b, :len(r)] = torch.tensor(r)
    batch.problems = [Problem("p", "Start 7. Add 5.", "12")] * len(texts)
    return batch


def test_identical_responses_share_critiques_and_failures_are_counted(tiny_policy):
    texts = ["7+5=12\nAnswer: 12", "7+5=12\nAnswer: 12", "7+5=13\nAnswer: 13"]
    steps = [[0] * 7 + [1] * 10] * 3
    batch = _text_batch(tiny_policy, texts, steps, [0, 0, 1])  # row 2, never judged, in a group of its own

    def script(p, i):
        return None if "13" in p else ("Wrong steps: [2]" if i == 0 else "hmm")

    critic = StepCritic(Scripted(script), tiny_policy.decode, seed=5)
    verdicts = critic.wrong_steps(batch, 3)
    assert len(critic.critic.prompts[0]) == 2  # two distinct responses
    assert "Step 1: 7+5=12\nStep 2: Answer: 12\n" in critic.critic.prompts[0][0]
    assert verdicts == [[{1}, None, None], [{1}, None, None], [None, None, None]]
    m = critic.metrics()
    assert (m["critic_calls"], m["critic_unparsed"], m["critic_no_verdict"]) == (6.0, 2.0, 1.0)
    adv = compute_advantages("capo", batch, {"k": 3}, critic=critic)
    assert adv[0, 7] < adv[0, 0] and torch.equal(adv[0], adv[1])  # only step 2 of rows 0, 1 is flagged
    critic.reset(seed=6)
    assert all(v == 0 for v in critic.metrics().values())


# ---- (5) the OpenAI-compatible client against a local stub server ------------------------------

SECRET = "sk-test-0123456789-do-not-log"


class StubServer:
    """A chat-completions endpoint on 127.0.0.1 whose behaviour is named in the prompt.

    ok: a completion; flaky: HTTP 500 the first time a prompt is seen, then ok; busy: 429; garbage: a
    reply that is not JSON; hang: answers after `hang_s`; drop: closes the connection without a reply.
    Serves at most `max_requests` requests or until `deadline_s`, then stops by itself.
    """

    def __init__(self, hang_s=1.0, max_requests=200, deadline_s=20.0):
        self.requests, self.seen, self.hang_s = [], set(), hang_s
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with stub.lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    first = prompt not in stub.seen
                    stub.seen.add(prompt)
                kind = prompt.split()[0]
                if kind == "drop":
                    self.close_connection = True
                    return
                if kind == "hang":
                    time.sleep(stub.hang_s)
                if kind == "busy" or (kind == "flaky" and first):
                    self.send_error(429 if kind == "busy" else 500)
                    return
                if kind == "later" and first:  # a rate limit that says when to come back
                    self.send_response(429)
                    self.send_header("Retry-After", "0.4")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                reply = b"{not json" if kind == "garbage" else json.dumps(
                    {"choices": [{"message": {"role": "assistant",
                                              "content": f"{prompt} -> Wrong steps: [1]"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that timed out: a broken pipe
        self.server.timeout = 0.05
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.stopped = threading.Event()
        deadline = time.monotonic() + deadline_s

        def serve():
            while not self.stopped.is_set() and len(self.requests) < max_requests and time.monotonic() < deadline:
                self.server.handle_request()
            self.server.server_close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def count(self, kind):
        return sum(r["body"]["messages"][0]["content"].split()[0] == kind for r in self.requests)

    def stop(self):
        self.stopped.set()
        self.thread.join(timeout=5)


@pytest.fixture()
def stub(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CAPO_TEST_KEY", SECRET)
    server = StubServer()
    yield server
    server.stop()


def _client(stub, **kw):
    args = {"base_url": stub.url, "model": "judge-70b", "api_key_env": "CAPO_TEST_KEY", "temperature": 0.7,
            "max_tokens": 64, "timeout_s": 0.3, "max_retries": 2, "backoff_s": 0.01, "concurrency": 4}
    return OpenAICompatibleCritic(**{**args, **kw})


def test_each_endpoint_failure_gives_none_and_is_counted(stub, caplog):
    client = _client(stub)
    kinds = ["ok", "flaky", "busy", "garbage", "hang", "drop"]
    with caplog.at_level(logging.DEBUG):
        texts = client.critique([f"{kind} solution" for kind in kinds], k=1, seed=0)
    assert texts == [["ok solution -> Wrong steps: [1]"], ["flaky solution -> Wrong steps: [1]"], [None], [None],
                     [None], [None]]
    # retried: 500 (once), 429, the timeout and the dropped connection; not retried: garbage JSON
    assert [stub.count(k) for k in kinds] == [1, 2, 3, 1, 3, 3]
    s = client.stats
    assert (s.calls, s.failures, s.cache_hits, s.requests) == (6, 4, 0, 13)
    assert s.seconds >= 3 * 0.3  # three timeouts
    assert "4 of 6 critiques failed" in caplog.text
    body = stub.requests[0]["body"]
    assert stub.requests[0]["path"] == "/v1/chat/completions"
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-70b", 0.7, 64)
    assert {r["auth"] for r in stub.requests} == {f"Bearer {SECRET}"}  # the key is sent ...
    assert SECRET not in caplog.text  # ... and never logged


def test_a_dead_endpoint_costs_one_round_of_failures_not_one_per_critique(stub):
    client = _client(stub, concurrency=2, max_retries=2)
    texts = client.critique([f"drop solution {i}" for i in range(20)], k=1, seed=0)
    assert all(t == [None] for t in texts) and client.stats.failures == 20
    # 2·concurrency = 4 critiques fail (3 requests each) before the rest are not sent; threads already
    # under way may add a few
    assert 12 <= stub.count("drop") <= 12 + 2 * 3


def test_the_servers_retry_after_is_waited_for(stub):
    client = _client(stub, backoff_s=0.0)
    start = time.perf_counter()
    texts = client.critique(["later solution"], k=1, seed=0)
    assert texts == [["later solution -> Wrong steps: [1]"]] and stub.count("later") == 2
    assert time.perf_counter() - start >= 0.4


def test_critiques_are_cached_in_memory_and_on_disk(stub, tmp_path):
    cache = tmp_path / "cache" / "critic.jsonl"
    client = _client(stub, cache_path=cache)
    first = client.critique(["ok a", "ok b", "busy c"], k=2, seed=0)
    assert len(stub.requests) == 4 + 3 * 2 and first[0][0] == first[0][1] == "ok a -> Wrong steps: [1]"
    before = len(stub.requests)
    again = client.critique(["ok a", "ok b"], k=2, seed=1)  # another seed: still the same cache entries
    assert again == first[:2] and len(stub.requests) == before
    assert (client.stats.calls, client.stats.cache_hits) == (10, 4)
    assert client.cache_key("ok a", 0) != client.cache_key("ok a", 1) != _client(stub, temperature=1.0).cache_key(
        "ok a", 1)
    with open(cache, "a") as fh:
        fh.write('{"key": "truncat')  # a run killed mid-write
    fresh = _client(stub, cache_path=cache)
    assert fresh.critique(["ok a", "ok b", "ok c"], k=2, seed=0)[:2] == first[:2]
    assert len(stub.requests) == before + 2 and fresh.stats.cache_hits == 4  # only "ok c" was asked for
    assert SECRET not in cache.read_text()


def test_a_cache_torn_by_a_kill_still_loads_after_more_critiques_are_appended(stub, tmp_path):
    cache = tmp_path / "critic.jsonl"
    first = _client(stub, cache_path=cache).critique(["ok a"], k=1, seed=0)
    with open(cache, "a") as fh:
        fh.write('{"key": "truncat')  # a run killed mid-write
    second = _client(stub, cache_path=cache).critique(["ok b"], k=1, seed=0)  # appended after the torn line
    again = _client(stub, cache_path=cache)
    assert again.critique(["ok a", "ok b"], k=1, seed=0) == first + second and again.stats.cache_hits == 2


def test_the_api_key_is_in_no_repr_config_or_saved_file(stub, tmp_path):
    client = _client(stub)
    assert SECRET not in repr(client) and SECRET not in str(client) and SECRET not in str(vars(client))
    cfg = load_config(None, ["method=capo", "critic.backend=openai", f"critic.base_url={stub.url}",
                             "critic.api_key_env=CAPO_TEST_KEY"])
    assert isinstance(build_critic(cfg.critic), OpenAICompatibleCritic)
    save_config(cfg, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert "CAPO_TEST_KEY" in saved and SECRET not in saved
    with pytest.raises(ConfigError, match="unknown key 'critic.api_key'") as err:
        load_config(None, ["method=capo", f"critic.api_key={SECRET}"])
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match="base_url"):
        build_critic(load_config(None, ["method=capo", "critic.backend=openai"]).critic)


# ---- (6) the local transformers critic (plumbing) ----------------------------------------------

def test_the_transformers_critic_samples_k_critiques_per_prompt(tiny_lab_model_dir):
    cfg = load_config(None, ["method=capo", "critic.backend=transformers", f"critic.model={tiny_lab_model_dir}",
                             "critic.max_tokens=6"])
    critic = build_critic(cfg.critic)
    assert isinstance(critic, TransformersCritic)
    texts = critic.critique(["Start 7. Add 5.", "Start 3. Times 2."], k=3, seed=0)
    assert [len(row) for row in texts] == [3, 3] and all(isinstance(t, str) for row in texts for t in row)
    assert texts == critic.critique(["Start 7. Add 5.", "Start 3. Times 2."], k=3, seed=0)  # seeded
    assert (critic.stats.calls, critic.stats.requests) == (12, 2)
    assert not any(p.requires_grad for p in critic.policy.model.parameters())
    # a prompt that would run the critique past the model's context gets none, and the others theirs
    room = critic.context - 6
    long = "Start 7. " + "Add 1. " * room
    texts = critic.critique(["Start 7. Add 5.", long], k=3, seed=0)
    assert texts[1] == [None] * 3 and all(isinstance(t, str) for t in texts[0])
    assert (critic.stats.calls, critic.stats.failures) == (18, 3)
    with pytest.raises(ValueError, match=f"critic.max_tokens {critic.context} leaves no room"):
        build_critic(load_config(None, ["method=capo", "critic.backend=transformers",
                                        f"critic.model={tiny_lab_model_dir}",
                                        f"critic.max_tokens={critic.context}"]).critic)


# ---- (7) end to end: the bundled lab model with an oracle critic -------------------------------

class LabOracle:
    """A critic that knows the lab: it reads the question and the numbered steps from the prompt and
    names the first step the lab verifier calls wrong.  Of k = 4 critiques, the third fails (None)
    and the fourth has no verdict, so the vote rests on the first two."""

    def __init__(self):
        self.stats = CriticStats()

    def verdict(self, prompt):
        question = re.search(r"Problem:\n(.*)\n", prompt)[1]
        block = prompt.split("Solution, in numbered steps:\n", 1)[1].split("\n\nCheck every step", 1)[0]
        steps = [re.sub(r"^Step \d+: ", "", line) for line in block.split("\n")]
        labels = judge(parse_question(question), "\n".join(steps)).step_correct
        if len(labels) != len(steps):
            return "The steps do not line up with the lines; I cannot tell."
        wrong = [j + 1 for j, ok in enumerate(labels) if not ok][:1]
        return f"Checked each line.\nWrong steps: {wrong}"

    def critique(self, prompts, k, seed):
        self.stats.calls += len(prompts) * k
        self.stats.failures += len(prompts) * (k > 2)
        return [[self.verdict(p), self.verdict(p), None, "no idea"][:k] for p in prompts]


@pytest.mark.slow
def test_capo_trains_the_lab_model_with_an_oracle_critic(tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", "method=capo", "train.steps=2",
                             "rollout.prompts_per_step=6", "rollout.group_size=4", "task.lab.train_size=60",
                             "task.lab.eval_size=2", "eval.k=1", "eval.before=false", "sampling.max_new_tokens=64",
                             "critic.backend=openai", "critic.base_url=http://127.0.0.1:9/v1"])  # never called
    trainer = Trainer(cfg, show_progress=False)
    assert isinstance(trainer.resources["critic"].critic, OpenAICompatibleCritic)
    trainer.resources["critic"] = StepCritic(LabOracle(), trainer.policy.decode)
    rollouts, _ = trainer.collect()
    verdicts = trainer.resources["critic"].wrong_steps(rollouts, 4)
    flagged = 0
    for b, row in enumerate(verdicts):
        labels = rollouts.step_labels[b][: int(rollouts.num_steps[b])].tolist()
        assert -1 not in labels  # the lab verifier judges exactly the steps step_ids cut
        wrong = [j for j, ok in enumerate(labels) if ok == 0][:1]
        assert row[:2] == [set(wrong)] * 2 and row[2:] == [None, None]  # the prompt's step j + 1 is step_ids' j
        flagged += bool(wrong)
    assert flagged > 0 and rollouts.correct.any()
    adv = compute_advantages("capo", rollouts, cfg.method_params, critic=trainer.resources["critic"])
    checked = 0
    for b, row in enumerate(verdicts):
        mask = rollouts.response_mask[b]
        bad = mask & (rollouts.step_ids[b] == min(row[0], default=-2))
        if bad.any() and (mask & ~bad).any():  # the flagged step scores below the response's other steps
            assert adv[b][bad].max() < adv[b][mask & ~bad].min()
            checked += 1
    assert checked > 0
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for m in records:
        assert all(math.isfinite(v) for v in m.values())
        assert m["critic_calls"] > 0 and m["critic_failures"] == m["critic_unparsed"] == m["critic_calls"] / 4
        assert m["critic_no_verdict"] == 0 and m["critic_seconds"] >= 0
    assert any(m["adv_abs_mean"] > 0 and m["grad_norm"] > 0 for m in records)
