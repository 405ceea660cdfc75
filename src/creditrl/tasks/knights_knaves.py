"""Knights and knaves: islanders who always tell the truth (knights) or always lie (knaves).

A puzzle (Logic-RL's and reasoning-gym's task) names 2–4 islanders, each making one statement about
the islanders' roles, with exactly one assignment of roles consistent with them all::

    Islanders: A B C. A says: B is a knave. B says: if A is a knight then C is a knave. C says: A is not
    a knight.

A statement is a literal about another islander (``B is a knight``, ``B is a knave``, ``B is not a
knight``, ...) or two literals about two different islanders, the speaker possibly one of them, joined
by ``and``, ``or`` or ``if ... then``.  The expected response reasons by supposition, one claim
per line, then the answer::

    Suppose A is a knight.
    Then B is a knave.
    Contradiction, so A is a knave.
    ...
    Answer: A knave, B knight, C knave

An assignment r is *consistent* when every islander X is a knight exactly when X's statement holds under
r.  The context of a line is the suppositions in force and the claims made under them (a claim made
inside a supposition is dropped when it is closed).  Each line is judged by enumerating all assignments:

- ``Suppose X is R.`` opens a supposition; it claims nothing and is right;
- ``Then X is R.`` is right when every consistent assignment satisfying the context has X = R;
- ``Contradiction, so X is R.`` closes the innermost supposition, which must be X with the other role;
  it is right when no consistent assignment satisfies the context outside that supposition together
  with it.  X = R then joins the outer context as a claim;
- the answer line (the last line) is right when it gives every islander's role, as the one consistent
  assignment does.

A wrong claim stays in the context (the response carries it on), so an error is blamed where it is
made; a context no consistent assignment satisfies entails every claim (ex falso), so inside a
supposition that is contradictory every ``Then`` line is right, and only its closing line can be
wrong.  The outcome is the answer alone: a response can reach the right roles after a wrong step.
"""

from __future__ import annotations

import itertools
import random
import re

from creditrl.config import KnightsKnavesSection
from creditrl.steps import split_steps
from creditrl.tasks.base import Problem, Verdict
from creditrl.tasks.registry import register_task
from creditrl.tasks.splits import GeneratedSplits

NAMES = "ABCD"
PHRASES = "Islanders: A B C D. says: is a knight knave not and or if then\nSuppose Then Contradiction, so Answer:"
ALPHABET = "".join(sorted(set(PHRASES)))
ROLE = {True: "knight", False: "knave"}
Statement = tuple  # ("is", X, knight: bool) | ("not", ("is", X, knight)) | ("and" | "or" | "if", literal, literal)
Assignment = dict[str, bool]  # islander -> is a knight

_ROLE = r"(knight|knave)"
_SUPPOSE = re.compile(rf"^Suppose ([A-D]) is a {_ROLE}\.$")
_THEN = re.compile(rf"^Then ([A-D]) is a {_ROLE}\.$")
_CLOSE = re.compile(rf"^Contradiction, so ([A-D]) is a {_ROLE}\.$")
_ANSWER = re.compile(rf"^Answer: ([A-D] {_ROLE}(?:, [A-D] {_ROLE})*)$")
_ANSWER_PAIR = re.compile(rf"([A-D]) {_ROLE}")


def holds(statement: Statement, r: Assignment) -> bool:
    kind = statement[0]
    if kind == "is":
        return r[statement[1]] == statement[2]
    if kind == "not":
        return not holds(statement[1], r)
    a, b = holds(statement[1], r), holds(statement[2], r)
    return a and b if kind == "and" else a or b if kind == "or" else (not a) or b


def render(statement: Statement) -> str:
    kind = statement[0]
    if kind == "is":
        return f"{statement[1]} is a {ROLE[statement[2]]}"
    if kind == "not":
        return f"{statement[1][1]} is not a {ROLE[statement[1][2]]}"
    if kind == "if":
        return f"if {render(statement[1])} then {render(statement[2])}"
    return f"{render(statement[1])} {kind} {render(statement[2])}"


def assignments(islanders: str) -> list[Assignment]:
    return [dict(zip(islanders, roles)) for roles in itertools.product((True, False), repeat=len(islanders))]


def consistent(statements: dict[str, Statement], r: Assignment, speakers: str | None = None) -> bool:
    """Every speaker (default: every islander) is a knight exactly when their statement holds."""
    return all(r[x] == holds(statements[x], r) for x in (statements if speakers is None else speakers))


def question(statements: dict[str, Statement]) -> str:
    return f"Islanders: {' '.join(statements)}. " + " ".join(f"{x} says: {render(s)}." for x, s in statements.items())


def random_statement(rng: random.Random, speaker: str, islanders: str) -> Statement:
    """A literal about another islander, or two literals about two different islanders (the speaker may be
    one) joined by and / or / if-then."""

    def literal(x: str) -> Statement:
        atom = ("is", x, rng.random() < 0.5)
        return ("not", atom) if rng.random() < 0.2 else atom

    kind = rng.choice(["literal", "literal", "and", "or", "if"])
    if kind == "literal":
        return literal(rng.choice([x for x in islanders if x != speaker]))
    first, second = rng.sample(islanders, 2)
    return (kind, literal(first), literal(second))


def sample_puzzle(rng: random.Random, cfg: KnightsKnavesSection) -> tuple[dict[str, Statement], Assignment]:
    """Statements drawn until exactly one assignment is consistent with them; (statements, that assignment)."""
    islanders = NAMES[:rng.randint(cfg.min_islanders, cfg.max_islanders)]
    while True:
        statements = {x: random_statement(rng, x, islanders) for x in islanders}
        solutions = [r for r in assignments(islanders) if consistent(statements, r)]
        if len(solutions) == 1:
            return statements, solutions[0]


def answer_text(r: Assignment) -> str:
    return "Answer: " + ", ".join(f"{x} {ROLE[k]}" for x, k in sorted(r.items()))


def read_answer(text: str) -> Assignment | None:
    """The roles an answer's `X role, Y role, ...` list gives; None when an islander is named twice."""
    pairs = _ANSWER_PAIR.findall(text)
    roles = {x: role == "knight" for x, role in pairs}
    return roles if len(roles) == len(pairs) else None


def entails(statements: dict[str, Statement], context: list[tuple[str, bool]], claim: tuple[str, bool]) -> bool:
    """Whether every consistent assignment satisfying the context's literals gives the claim."""
    return all(r[claim[0]] == claim[1] for r in assignments("".join(statements))
               if consistent(statements, r) and all(r[x] == k for x, k in context))


def judge(statements: dict[str, Statement], solution: Assignment, response: str) -> Verdict:
    """Outcome (the answer) and per-line correctness, one step per `newline`-splitter step."""
    lines = [response[start:end].strip() for start, end in split_steps(response, KnightsKnavesTask.step_splitter)]
    if not lines:  # an empty response is one wrong step (its end-of-sequence token)
        return Verdict(correct=False, step_correct=(False,), format_ok=False)
    levels: list[list[tuple[str, bool]]] = [[]]  # level 0: top-level claims; level i: supposition i, its claims
    steps: list[bool] = []
    answer: Assignment | None = None
    for j, line in enumerate(lines):
        context = [literal for level in levels for literal in level]
        suppose, then, close, final = _SUPPOSE.match(line), _THEN.match(line), _CLOSE.match(line), _ANSWER.match(line)
        if suppose:
            levels.append([(suppose[1], suppose[2] == "knight")])
            steps.append(True)
        elif then:
            claim = (then[1], then[2] == "knight")
            steps.append(entails(statements, context, claim))
            levels[-1].append(claim)
        elif close:
            claim = (close[1], close[2] == "knight")
            if len(levels) > 1 and levels[-1][0] == (claim[0], not claim[1]):
                outer = [literal for level in levels[:-1] for literal in level]
                steps.append(entails(statements, outer, claim))
                levels.pop()
            else:  # no supposition of the other role to close: a bare (wrong) claim
                steps.append(False)
            levels[-1].append(claim)
        elif final and j == len(lines) - 1:
            answer = read_answer(final[1])
            steps.append(answer == solution)
        else:
            steps.append(False)
    return Verdict(correct=answer == solution, step_correct=tuple(steps), format_ok=answer is not None,
                   answer=None if answer is None else answer_text(answer).removeprefix("Answer: "))


def forced(statements: dict[str, Statement], known: Assignment) -> tuple[bool, Assignment]:
    """Unit propagation from the statements of the islanders whose role is known: (whether some assignment
    agrees with `known` and those statements, the roles all such assignments agree on)."""
    fits = [r for r in assignments("".join(statements))
            if all(r[x] == k for x, k in known.items()) and consistent(statements, r, "".join(known))]
    if not fits:
        return False, {}
    return True, {x: fits[0][x] for x in statements if all(r[x] == fits[0][x] for r in fits)}


def noisy_solution(statements: dict[str, Statement], rng: random.Random, error_rate: float) -> str:
    """Reasoning by supposition, as a person would: suppose the first islander of unknown role is a knight,
    derive the roles the known islanders' statements force, close the supposition on a contradiction.  With
    probability `error_rate` a derived role is flipped, and the reasoning goes on from the flipped claim."""
    levels: list[list[tuple[str, bool]]] = [[]]
    lines: list[str] = []
    while len(lines) < 4 * len(statements) + 4:
        known = dict(literal for level in levels for literal in level)
        possible, roles = forced(statements, known)
        if not possible and len(levels) > 1:
            x, knight = levels.pop()[0]
            lines.append(f"Contradiction, so {x} is a {ROLE[not knight]}.")
            levels[-1].append((x, not knight))
            continue
        new = [x for x in roles if x not in known]
        if possible and new:
            x = new[0]
            knight = roles[x] != (rng.random() < error_rate)
            lines.append(f"Then {x} is a {ROLE[knight]}.")
            levels[-1].append((x, knight))
            continue
        unknown = [x for x in statements if x not in known]
        if not possible or not unknown:
            break
        lines.append(f"Suppose {unknown[0]} is a knight.")
        levels.append([(unknown[0], True)])
    known = dict(literal for level in levels for literal in level)
    return "\n".join(lines + [answer_text({x: known.get(x, True) for x in statements})])


class KnightsKnavesTask(GeneratedSplits):
    """Seeded train and held-out splits of knights-and-knaves puzzles with an exact step verifier."""

    name = "knights_knaves"
    step_splitter = "newline"
    alphabet = ALPHABET

    def __init__(self, cfg: KnightsKnavesSection | None = None):
        super().__init__(cfg or KnightsKnavesSection())

    def _generate(self, rng: random.Random) -> Problem:
        statements, solution = sample_puzzle(rng, self.cfg)
        return Problem(id=self.name, prompt=question(statements),
                       answer=answer_text(solution).removeprefix("Answer: "),
                       meta={"difficulty": len(statements), "statements": statements})

    def verify(self, problem: Problem, response: str) -> Verdict:
        statements = problem.meta["statements"]
        solution = [r for r in assignments("".join(statements)) if consistent(statements, r)]
        return judge(statements, solution[0], response)

    def noisy_solution(self, problem: Problem, rng: random.Random, error_rate: float) -> str:
        return noisy_solution(problem.meta["statements"], rng, error_rate)


@register_task("knights_knaves", config=KnightsKnavesSection)
def knights_knaves_task(cfg: KnightsKnavesSection) -> KnightsKnavesTask:
    """Knights and knaves with the section's knobs."""
    return KnightsKnavesTask(cfg)
