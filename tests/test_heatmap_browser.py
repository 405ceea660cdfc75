"""The credit heat-map page in a real headless browser (Debian's `chromium`): it loads without console
messages, needs no network, navigates between prompts, and its screenshot shows the coloured tokens."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from creditrl.collect import build_rollouts, response_steps
from creditrl.credit import compute_credit
from creditrl.credit_metrics import credit_accuracy
from creditrl.policy.loading import load_policy
from creditrl.policy.transformers_backend import Generation
from creditrl.report.heatmap import LEVELS, level_colour, write_heatmap
from creditrl.rewards import RewardConfig
from creditrl.tasks.lab import LabTask, LabTaskConfig, apply, parse_question

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")

WIDTH, HEIGHT = 1400, 2400
HOSTILE = "<script>alert('x')</script> & "  # prefixed to the first prompt's text: it must show as text


def _response(prompt: str, error_line: int | None = None) -> str:
    """The worked solution, with the result of line `error_line` off by one and carried on from there
    (so that line is the only wrong step, and the answer is wrong)."""
    chain = parse_question(prompt)
    value, lines = chain.start, []
    for j, (op, x) in enumerate(chain.ops):
        result = apply(value, op, x) + (j == error_line)
        lines.append(f"{value}{op}{x}={result}")
        value = result
    return "\n".join(lines + [f"Answer: {value}"])


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """Two lab prompts × 4 hand-written responses (right, error in step 1, right, error in step 2), every method's
    credit."""
    policy = load_policy("lab")
    task = LabTask(LabTaskConfig(train_size=1, eval_size=2))
    problems = task.eval_problems()
    texts, prompt_ids, problem_index = [], [], []
    for i, problem in enumerate(problems):
        texts += [_response(problem.prompt), _response(problem.prompt, 0), _response(problem.prompt),
                  _response(problem.prompt, 1)]
        prompt_ids += [policy.encode_prompt(problem.prompt)] * 4
        problem_index += [i] * 4
    response_ids = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] + [policy.eos_ids[0]] for t in texts]
    decoded, step_rows = zip(*(response_steps(policy, ids, task.step_splitter) for ids in response_ids))
    verdicts = [task.verify(problems[p], t) for p, t in zip(problem_index, decoded)]
    generation = Generation(prompt_ids, response_ids, [False] * len(texts))
    batch = build_rollouts(policy, generation, verdicts, list(decoded), list(step_rows), problem_index, RewardConfig())
    assert batch.correct.tolist() == [True, False, True, False] * 2
    maps = compute_credit(batch, [HOSTILE + problems[0].prompt, problems[1].prompt], policy)
    accuracy = {name: credit_accuracy(c, batch) for name, c in maps.credit.items()}
    return write_heatmap(tmp_path_factory.mktemp("heatmap") / "credit.html", maps, accuracy, context="browser test")


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--force-color-profile=srgb",
               "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=3000", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _console_lines(stderr: str) -> list[str]:
    """The page's console messages (errors, uncaught exceptions, logs) as chromium logs them."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _count_colour(pixels: torch.Tensor, rgb: tuple[int, int, int], tolerance: int = 3) -> int:
    return int(((pixels - torch.tensor(rgb)).abs() <= tolerance).all(-1).sum())


@needs_chromium
def test_screenshot_shows_coloured_tokens_and_no_console_errors(page, tmp_path):
    shot = tmp_path / "credit.png"
    result = _chromium(page.as_uri(), tmp_path / "profile", f"--screenshot={shot}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _console_lines(result.stderr) == []
    image = Image.open(shot).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(HEIGHT, WIDTH, 3).int()
    strong = range(LEVELS // 2, LEVELS + 1)
    red = sum(_count_colour(pixels, level_colour(-k)) for k in strong)
    blue = sum(_count_colour(pixels, level_colour(k)) for k in strong)
    # the legend holds under 5,000 such pixels; each prompt's block of method rows holds far more
    assert red > 20_000 and blue > 20_000, (red, blue)


@needs_chromium
def test_console_errors_would_be_caught(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><script>notDefined();</script></body></html>")
    result = _chromium(broken.as_uri(), tmp_path / "profile", "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in _console_lines(result.stderr))


@needs_chromium
def test_navigation_by_hash_and_list(page, tmp_path):
    result = _chromium(page.as_uri() + "#p1", tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0 and _console_lines(result.stderr) == []
    dom = result.stdout
    assert '<body class="js">' in dom
    assert re.search(r'<section class="prompt" id="p0">', dom)
    assert re.search(r'<section class="prompt current" id="p1">', dom)
    assert re.search(r'<span id="counter">prompt 2 of 2</span>', dom)
    assert re.search(r'<li class="active"><a href="#p1">', dom)


def test_page_is_self_contained_and_escaped(page):
    text = page.read_text()
    links = re.findall(r'(?:href|src)="([^"]*)"', text)
    assert links and all(link.startswith("#") for link in links)
    assert "<link" not in text and "@import" not in text and "url(" not in text and "http" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;" in text and "<script>alert" not in text
    # every method row and the verifier row of every response, the true first wrong step marked
    assert text.count('<div class="response">') == 8
    assert text.count("true first wrong step: 1") == 2 and text.count("true first wrong step: 2") == 2
    assert text.count('<div class="label" title="step labels from the task&#x27;s verifier">verifier</div>') == 8
    assert text.count(">grpo <small>") == 8 and text.count(">denser <small>") == 8
