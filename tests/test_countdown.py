import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creditrl.config import ConfigError, CountdownSection
from creditrl.configure import load_config
from creditrl.steps import split_steps
from creditrl.tasks.countdown import CountdownTask, Puzzle, judge, noisy_solution, parse_question, sample_puzzle

# Numbers 2 3 5, target 25.  The one way: 2+3=5, then 5*5=25.  Every other first move loses: 2*3=6 leaves
# {5, 6} (11, 1, 30), 3*5=15 leaves {2, 15} (17, 13, 30), 2+5=7 leaves {3, 7} (10, 4, 21), 5-3=2 leaves
# {2, 2} (4, 4, 1), ...
PUZZLE = Puzzle((2, 3, 5), 25)


def test_question_text_round_trips():
    assert PUZZLE.question() == "Numbers: 2 3 5. Target: 25."
    assert parse_question(PUZZLE.question()) == PUZZLE
    with pytest.raises(ValueError, match="not a countdown question"):
        parse_question("Numbers: 2 3 5 Target 25")


def test_a_right_solution_is_right_under_both_labels():
    v = judge(PUZZLE, "2+3=5\n5*5=25\nAnswer: 25")
    assert v.correct and v.step_correct == (True, True, True) and v.answer == "25"
    assert v.step_labels == {"valid": (True, True, True), "solvable": (True, True, True)}


def test_a_valid_step_that_loses_the_game_is_wrong_only_under_solvable():
    # 2*3=6 is legal and right, but from {5, 6} no 25 can be made; 6*5=30 is legal too.  Only the answer
    # line breaks a rule (30 is not the target), so `valid` blames the last line and `solvable` the first.
    v = judge(PUZZLE, "2*3=6\n6*5=30\nAnswer: 30")
    assert not v.correct
    assert v.step_labels == {"valid": (True, True, False), "solvable": (False, False, False)}
    assert v.step_correct == v.step_labels["solvable"] and v.first_wrong_step == 0


def test_unavailable_operands_inexact_division_and_a_slip_carried_on():
    # 5*5 needs two 5s: nothing is used or made, so the claimed 25 is never available
    assert judge(PUZZLE, "5*5=25\nAnswer: 25").step_labels == {"valid": (False, False), "solvable": (False, False)}
    # 5/2 is not exact; 3-5 is not positive
    assert judge(PUZZLE, "5/2=2\nAnswer: 2").step_labels["valid"] == (False, False)
    assert judge(PUZZLE, "3-5=2\nAnswer: 2").step_labels["valid"] == (False, False)
    # 2+3 is 5, not 6; 6 is carried on and 6*5=30 is right arithmetic on it, so the slip is blamed once
    v = judge(PUZZLE, "2+3=6\n6*5=30\nAnswer: 30")
    assert v.step_labels == {"valid": (False, True, False), "solvable": (False, False, False)}
    # a miscomputed result that happens to keep the game open is invalid, hence not solvable either
    assert judge(Puzzle((2, 3, 5, 1), 25), "2+3=4\n4+1=5\n5*5=25\nAnswer: 25").step_labels == {
        "valid": (False, True, True, True), "solvable": (False, True, True, True)}


def test_garbage_empty_and_a_missing_answer():
    v = judge(PUZZLE, "let me think\n2+3=5")
    assert not v.correct and not v.format_ok and v.step_labels["valid"] == (False, True)
    assert v.step_labels["solvable"] == (False, True)
    assert judge(PUZZLE, "").step_correct == (False,)


# ---- the verifier against an independent brute-force labeller -------------------------------------------
def reachable(values: list[int]) -> set[int]:
    """Every value some expression over a sub-multiset of `values` makes under the game's rules, by the values
    of each index subset (subset DP: a subset's values combine those of its two parts)."""
    n = len(values)
    made: dict[int, set[int]] = {1 << i: {v} for i, v in enumerate(values)}
    for mask in sorted(range(1, 1 << n), key=lambda m: bin(m).count("1")):
        if mask in made:
            continue
        out = set()
        part = (mask - 1) & mask
        while part:
            rest = mask ^ part
            for a in made[part]:
                for b in made[rest]:
                    out |= {a + b, a * b}
                    if a > b:
                        out.add(a - b)
                    if a % b == 0:
                        out.add(a // b)
            part = (part - 1) & mask
        made[mask] = out
    return set().union(*made.values()) if made else set()


def brute_labels(numbers: tuple[int, ...], target: int, response: str) -> tuple[list[bool], list[bool], bool]:
    lines = [response[s:e].strip() for s, e in split_steps(response, "newline")] or [""]
    pool = Counter(numbers)
    valid, solvable, answered = [], [], False
    for j, line in enumerate(lines):
        if line.startswith("Answer: ") and j == len(lines) - 1 and line[8:].lstrip("-").isdigit():
            ok = int(line[8:]) == target and pool[target] > 0
            valid.append(ok)
            solvable.append(ok)
            answered = True
            continue
        parts = None
        if line.count("=") == 1:
            left, written = line.split("=")
            for op in "+-*/":
                pieces = left.split(op)
                if len(pieces) == 2 and all(p.isdigit() for p in pieces) and written.lstrip("-").isdigit() \
                        and written.count("-") <= 1 and (written[0] == "-" or written.isdigit()):
                    parts = int(pieces[0]), op, int(pieces[1]), int(written)
        if parts is None:
            valid.append(False)
            solvable.append(False)
            continue
        a, op, b, w = parts
        need = Counter([a, b])
        available = all(pool[x] >= k for x, k in need.items())
        truth = {"+": a + b, "*": a * b, "-": a - b if a > b else None, "/": a // b if b and a % b == 0 else None}[op]
        ok = available and truth == w
        if available:
            pool -= need
            if w > 0:
                pool[w] += 1
        valid.append(ok)
        solvable.append(ok and target in reachable(list(pool.elements())))
    return valid, solvable, answered and all(valid)


@st.composite
def puzzles_and_responses(draw):
    numbers = tuple(draw(st.lists(st.integers(1, 12), min_size=2, max_size=4)))
    target = draw(st.integers(1, 60))
    pool, lines = list(numbers), []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["move", "move", "any", "garbage"]))
        if kind == "garbage":
            lines.append(draw(st.sampled_from(["hmm", "3 + 4 = 7", "=", "1+=2", "Answer: x", ""])))
            continue
        a = draw(st.sampled_from(pool)) if kind == "move" else draw(st.integers(0, 15))
        b = draw(st.sampled_from(pool)) if kind == "move" else draw(st.integers(0, 15))
        op = draw(st.sampled_from("+-*/"))
        right = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        written = right + draw(st.sampled_from([0, 0, 0, 1, -2]))
        lines.append(f"{a}{op}{b}={written}")
        pool.append(written if written > 0 else 1)
    claim = draw(st.sampled_from([target, target + 1, pool[-1]]))
    lines.append(draw(st.sampled_from([f"Answer: {claim}", f"Answer: {claim}", "no answer"])))
    return numbers, target, "\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(puzzles_and_responses())
def test_the_verifier_agrees_with_a_brute_force_labeller(case):
    numbers, target, response = case
    v = judge(Puzzle(numbers, target), response)
    valid, solvable, correct = brute_labels(numbers, target, response)
    assert v.step_labels == {"valid": tuple(valid), "solvable": tuple(solvable)}
    assert v.step_correct == tuple(solvable) and v.correct == correct
    assert len(v.step_correct) == max(1, len(split_steps(response, "newline")))


# ---- the generator, the noisy solutions, the settings ----------------------------------------------------
def test_puzzles_are_solvable_seeded_and_split_disjointly():
    cfg = CountdownSection(min_numbers=3, max_numbers=5, train_size=60, eval_size=30)
    task, again = CountdownTask(cfg), CountdownTask(cfg)
    assert [p.prompt for p in task.eval_problems()] == [p.prompt for p in again.eval_problems()]
    held_out = {p.prompt for p in task.eval_problems()}
    assert len(held_out) == 30 and not held_out & {p.prompt for p in task.train_problems()}
    for problem in task.eval_problems() + task.train_problems()[:10]:
        puzzle = parse_question(problem.prompt)
        assert 3 <= problem.meta["difficulty"] == len(puzzle.numbers) <= 5 and problem.answer == str(puzzle.target)
        assert puzzle.target not in puzzle.numbers and 2 <= puzzle.target <= cfg.target_max
        assert puzzle.target in reachable(list(puzzle.numbers))
    assert {p.meta["difficulty"] for p in task.eval_problems()} == {3, 4, 5}


def test_noisy_solutions_are_right_without_errors_and_wrong_with_only_errors():
    rng, cfg = random.Random(0), CountdownSection()
    for _ in range(40):
        puzzle = sample_puzzle(rng, cfg)
        assert judge(puzzle, noisy_solution(puzzle, rng, 0.0)).correct
        wrong = judge(puzzle, noisy_solution(puzzle, rng, 1.0))
        assert not wrong.correct and wrong.step_correct[0] is False
        assert set(noisy_solution(puzzle, rng, 0.5)) <= set(CountdownTask.alphabet)


def test_bad_settings_and_another_tasks_key_name_the_key():
    with pytest.raises(ConfigError, match="task.min_numbers"):
        load_config(None, ["task.name=countdown", "task.min_numbers=7"])
    with pytest.raises(ConfigError, match=r"min_numbers \(5\) must not exceed max_numbers \(3\)"):
        load_config(None, ["task.name=countdown", "task.min_numbers=5"])
    with pytest.raises(ConfigError, match="task.lab"):
        load_config(None, ["task.name=countdown", "task.lab.min_steps=3"])
    assert load_config(None, ["task.name=countdown"]).model.name == "countdown"


@pytest.mark.slow
def test_a_process_reward_method_trains_on_countdowns_step_labels(tiny_lab_model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from creditrl.cli import app

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--quiet", "task.name=countdown", "task.train_size=8",
                                      "task.eval_size=2", f"model.name={tiny_lab_model_dir}", "method=process_grpo",
                                      f"output.dir={run}", "train.steps=1", "rollout.prompts_per_step=2",
                                      "rollout.group_size=2", "eval.k=1", "sampling.max_new_tokens=12"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 1
