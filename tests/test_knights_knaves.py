import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creditrl.config import ConfigError, KnightsKnavesSection
from creditrl.configure import load_config
from creditrl.steps import split_steps
from creditrl.tasks.base import Problem
from creditrl.tasks.knights_knaves import (
    ALPHABET,
    KnightsKnavesTask,
    judge,
    noisy_solution,
    question,
    sample_puzzle,
)

# A says: A is a knave or B is a knight.  B says: A is a knight.
# A a knave would make "A is a knave" true, so A's statement true: a knave cannot say it.  So A is a knight, A's
# statement is true, and "A is a knave" being false, B is a knight; B's statement (A is a knight) is then true,
# as a knight's must be.  The one solution: A knight, B knight.
STATEMENTS = {"A": ("or", ("is", "A", False), ("is", "B", True)), "B": ("is", "A", True)}
SOLUTION = {"A": True, "B": True}


def steps(response: str) -> tuple[bool, ...]:
    return judge(STATEMENTS, SOLUTION, response).step_correct


def test_question_text():
    assert question(STATEMENTS) == "Islanders: A B. A says: A is a knave or B is a knight. B says: A is a knight."


def test_a_proof_by_supposition_is_right_step_by_step():
    v = judge(STATEMENTS, SOLUTION, "Suppose A is a knave.\nContradiction, so A is a knight.\nThen B is a knight.\n"
                                    "Answer: A knight, B knight")
    assert v.correct and v.step_correct == (True,) * 4 and v.answer == "A knight, B knight"


def test_the_right_answer_after_a_wrong_step_is_right_by_luck():
    # with nothing supposed, B is a knight follows, so "B is a knave" is wrong; the answer is still right
    v = judge(STATEMENTS, SOLUTION, "Then B is a knave.\nAnswer: A knight, B knight")
    assert v.correct and v.step_correct == (False, True) and v.first_wrong_step == 0


def test_a_contradiction_that_is_not_one_and_a_wrong_answer():
    # A a knight is consistent (it is the solution), so closing the supposition is wrong
    v = judge(STATEMENTS, SOLUTION, "Suppose A is a knight.\nContradiction, so A is a knave.\nAnswer: A knave, B knave")
    assert not v.correct and v.step_correct == (True, False, False)


def test_inside_a_contradictory_supposition_every_claim_follows():
    assert steps("Suppose A is a knave.\nThen B is a knave.\nThen B is a knight.\nContradiction, so A is a knight.\n"
                 "Answer: A knight, B knight") == (True,) * 5


def test_a_wrong_claim_is_carried_on_and_blamed_once():
    # after the wrong "A is a knave" no consistent assignment fits the context, so the next claim follows
    assert steps("Then A is a knave.\nThen B is a knave.\nAnswer: A knight, B knight") == (False, True, True)


def test_closing_what_is_not_the_innermost_supposition_and_malformed_answers():
    assert steps("Suppose A is a knight.\nContradiction, so B is a knave.\nAnswer: A knight, B knight")[1] is False
    assert steps("Contradiction, so A is a knight.\nAnswer: A knight, B knight") == (False, True)
    assert judge(STATEMENTS, SOLUTION, "Answer: A knight").step_correct == (False,)  # B's role missing
    twice = judge(STATEMENTS, SOLUTION, "Answer: A knight, A knight, B knight")
    assert not twice.correct and not twice.format_ok
    assert steps("Answer: A knight, B knight\nThen B is a knight.") == (False, True)  # an answer not last
    assert steps("") == (False,)


# ---- the verifier against an independent brute-force labeller -------------------------------------------
def parse_prompt(prompt: str) -> dict[str, str]:
    """speaker -> statement text, from the question text itself."""
    body = prompt.split(". ", 1)[1]
    return {part[0]: part[len("A says: "):] for part in body.rstrip(".").split(". ")}


def truth(text: str, roles: dict[str, bool]) -> bool:
    """A statement's truth, read from its words: 'if P then Q', 'P and Q', 'P or Q', 'X is [not] a knight|knave'."""
    if text.startswith("if "):
        p, q = text[3:].split(" then ")
        return not truth(p, roles) or truth(q, roles)
    for word, combine in ((" and ", all), (" or ", any)):
        if word in text:
            return combine(truth(part, roles) for part in text.split(word))
    words = text.split()
    value = roles[words[0]] == (words[-1] == "knight")
    return not value if "not" in words else value


ROLES = ("knight", "knave")


def brute_labels(prompt: str, response: str) -> tuple[list[bool], bool]:
    said = parse_prompt(prompt)
    worlds = [dict(zip(said, roles)) for roles in itertools.product([True, False], repeat=len(said))]
    worlds = [w for w in worlds if all(w[x] == truth(s, w) for x, s in said.items())]
    (solution,) = worlds
    lines = [response[a:b].strip() for a, b in split_steps(response, "newline")] or [""]
    stack, labels, correct = [[]], [], False  # stack of levels of (islander, knight) literals
    for j, line in enumerate(lines):
        words = line.rstrip(".").replace(",", "").split()
        known = [lit for level in stack for lit in level]
        if line.startswith("Answer: ") and j == len(lines) - 1:
            pairs = [(words[i], words[i + 1]) for i in range(1, len(words) - 1, 2)]
            ok = len(words) % 2 == 1 and len({x for x, _ in pairs}) == len(pairs) == len(said) \
                and all(role in ("knight", "knave") and solution.get(x) == (role == "knight") for x, role in pairs)
            labels.append(ok)
            correct = ok
        elif len(words) == 5 and words[0] == "Suppose" and words[2:4] == ["is", "a"] and words[4] in ROLES:
            stack.append([(words[1], words[4] == "knight")])
            labels.append(True)
        elif len(words) == 5 and words[0] == "Then" and line.endswith(".") and words[4] in ("knight", "knave"):
            x, k = words[1], words[4] == "knight"
            labels.append(all(w[x] == k for w in worlds if all(w[y] == v for y, v in known)))
            stack[-1].append((x, k))
        elif words[:2] == ["Contradiction", "so"] and len(words) == 6 and line.endswith("."):
            x, k = words[2], words[5] == "knight"
            if len(stack) > 1 and stack[-1][0] == (x, not k):
                stack.pop()
                outer = [lit for level in stack for lit in level]
                labels.append(not any(w[x] == (not k) for w in worlds if all(w[y] == v for y, v in outer)))
            else:
                labels.append(False)
            stack[-1].append((x, k))
        else:
            labels.append(False)
    return labels, correct


@st.composite
def puzzles_and_responses(draw):
    statements, _ = sample_puzzle(random.Random(draw(st.integers(0, 10**6))), KnightsKnavesSection(max_islanders=4))
    names = list(statements)
    role = st.sampled_from(["knight", "knave"])
    lines = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from(["Suppose", "Then", "Then", "Contradiction", "junk"]))
        x = draw(st.sampled_from(names))
        if kind == "Contradiction":
            lines.append(f"Contradiction, so {x} is a {draw(role)}.")
        elif kind == "junk":
            lines.append(draw(st.sampled_from(["Then A is a wizard.", "so", "Answer: A knight", "Suppose A is."])))
        else:
            lines.append(f"{kind} {x} is a {draw(role)}.")
    roles = draw(st.permutations([f"{x} {draw(role)}" for x in names]))
    lines.append(draw(st.sampled_from([f"Answer: {', '.join(roles)}", f"Answer: {', '.join(roles[:-1])}", "done"])))
    return statements, "\n".join(lines)


TINY_TASK = KnightsKnavesTask(KnightsKnavesSection(train_size=1, eval_size=1))


@settings(max_examples=200, deadline=None)
@given(puzzles_and_responses())
def test_the_verifier_agrees_with_a_brute_force_labeller(case):
    statements, response = case
    problem = Problem("p", question(statements), "", {"statements": statements})
    labels, correct = brute_labels(problem.prompt, response)
    v = TINY_TASK.verify(problem, response)
    assert v.step_correct == tuple(labels) and v.correct == correct


# ---- the generator, the noisy solutions, the settings ----------------------------------------------------
def test_puzzles_have_one_solution_and_are_seeded_and_split_disjointly():
    cfg = KnightsKnavesSection(min_islanders=2, max_islanders=4, train_size=40, eval_size=30)
    task = KnightsKnavesTask(cfg)
    assert [p.prompt for p in task.eval_problems()] == [p.prompt for p in KnightsKnavesTask(cfg).eval_problems()]
    assert not {p.prompt for p in task.eval_problems()} & {p.prompt for p in task.train_problems()}
    for problem in task.eval_problems():
        said = parse_prompt(problem.prompt)
        worlds = [dict(zip(said, r)) for r in itertools.product([True, False], repeat=len(said))]
        (solution,) = [w for w in worlds if all(w[x] == truth(s, w) for x, s in said.items())]
        assert problem.answer == ", ".join(f"{x} {'knight' if k else 'knave'}" for x, k in solution.items())
        assert problem.meta["difficulty"] == len(said) and set(problem.prompt) <= set(ALPHABET)
    assert {p.meta["difficulty"] for p in task.eval_problems()} == {2, 3, 4}


def test_noisy_solutions_are_right_without_errors_and_their_errors_are_caught():
    """With every derived role flipped, a claim made outside any supposition after only right steps has a
    consistent context, in which its flipped role does not follow: it is caught."""
    rng, cfg = random.Random(0), KnightsKnavesSection(max_islanders=4)
    caught = 0
    for _ in range(60):
        statements, solution = sample_puzzle(rng, cfg)
        clean = judge(statements, solution, noisy_solution(statements, rng, 0.0))
        assert clean.correct and all(clean.step_correct)
        lines = noisy_solution(statements, rng, 1.0).split("\n")
        assert set("".join(lines)) <= set(ALPHABET)
        labels = judge(statements, solution, "\n".join(lines)).step_correct
        depth = list(itertools.accumulate(line.startswith("Suppose") - line.startswith("Contradiction")
                                          for line in lines))
        top = [j for j, line in enumerate(lines) if line.startswith("Then") and depth[j] == 0]
        if top and all(labels[:top[0]]):
            assert labels[top[0]] is False
            caught += 1
    assert caught >= 20


def test_bad_settings_and_another_tasks_key_name_the_key():
    with pytest.raises(ConfigError, match="task.max_islanders"):
        load_config(None, ["task.name=knights_knaves", "task.max_islanders=5"])
    with pytest.raises(ConfigError, match=r"min_islanders \(4\) must not exceed max_islanders \(3\)"):
        load_config(None, ["task.name=knights_knaves", "task.min_islanders=4"])
    with pytest.raises(ConfigError, match="task.min_numbers"):
        load_config(None, ["task.name=knights_knaves", "task.min_numbers=3"])
