import random

import pytest

from creditrl.lab.tokenizer import build_char_tokenizer
from creditrl.tasks.lab import Chain, LabTask, LabTaskConfig, judge, noisy_chain_solution, parse_question, sample_chain

CHAIN = Chain(start=7, ops=(("+", 5), ("*", 3), ("-", 4)))


def test_question_and_solution_text():
    assert CHAIN.question() == "Start 7. Add 5. Times 3. Minus 4."
    assert CHAIN.solution() == "7+5=12\n12*3=36\n36-4=32\nAnswer: 32"
    assert parse_question(CHAIN.question()) == CHAIN


def test_correct_solution_has_all_steps_right():
    v = judge(CHAIN, CHAIN.solution())
    assert v.correct and v.step_correct == (True, True, True, True) and v.first_wrong_step is None
    assert v.answer == "32"


def test_arithmetic_error_is_blamed_once_where_it_happens():
    # 12*3 is 36, not 35; the later lines carry 35 on correctly, so only line 2 is wrong.
    v = judge(CHAIN, "7+5=12\n12*3=35\n35-4=31\nAnswer: 31")
    assert not v.correct
    assert v.step_correct == (True, False, True, True)
    assert v.first_wrong_step == 1


def test_wrong_operation_wrong_carry_and_missing_steps():
    assert judge(CHAIN, "7+6=13\n13*3=39\n39-4=35\nAnswer: 35").step_correct == (False, True, True, True)
    assert judge(CHAIN, "7+5=12\n10*3=30\n30-4=26\nAnswer: 26").step_correct == (True, False, True, True)
    short = judge(CHAIN, "7+5=12\n12*3=36\nAnswer: 36")
    assert not short.correct and short.step_correct == (True, True, False)


def test_negative_values_after_an_error_are_read_and_the_error_blamed_once():
    # 17-16 is 1, not 0; carried on, 0-1=-1 and -1+19=18 are right arithmetic on the carried values
    chain = parse_question("Start 17. Minus 16. Minus 1. Add 19. Add 14.")
    v = judge(chain, "17-16=0\n0-1=-1\n-1+19=18\n18+14=32\nAnswer: 32")
    assert v.step_correct == (False, True, True, True, True) and not v.correct
    assert judge(chain, "17-16=1\n1-1=0\n0+19=19\n19+14=33\nAnswer: -5").step_correct == (True,) * 4 + (False,)


def test_after_an_unreadable_line_the_next_is_judged_on_its_own_arithmetic():
    v = judge(CHAIN, "7+5=12\n12 times 3 is 36\n36-4=32\nAnswer: 32")
    assert v.correct and v.step_correct == (True, False, True, True)
    assert judge(CHAIN, "7+5=12\n12*3=36\n36 - 4 = 32\nAnswer: 32").step_correct == (True, True, False, True)


def test_garbage_and_missing_answer():
    v = judge(CHAIN, "hello\n7+5=12")
    assert not v.correct and not v.format_ok and v.step_correct == (False, False)  # line 2 is judged as operation 2
    assert judge(CHAIN, "").step_correct == (False,)  # an empty response: one wrong step, its <eos>


def test_generator_respects_knobs():
    cfg = LabTaskConfig(min_steps=2, max_steps=5)
    rng = random.Random(0)
    for _ in range(500):
        chain = sample_chain(rng, cfg)
        assert 2 <= len(chain.ops) <= 5 and 1 <= chain.start <= 30
        values = chain.values()
        assert all(0 <= v <= 999 for v in values)
        for (op, x), v in zip(chain.ops, values):
            if op == "*":
                assert 2 <= x <= 9 and v <= 99
            else:
                assert 1 <= x <= 30


def test_splits_are_seeded_and_disjoint():
    a = LabTask(LabTaskConfig(train_size=300, eval_size=50, seed=3))
    b = LabTask(LabTaskConfig(train_size=300, eval_size=50, seed=3))
    assert [p.prompt for p in a.train_problems()] == [p.prompt for p in b.train_problems()]
    other = LabTask(LabTaskConfig(train_size=300, eval_size=50, seed=4))
    assert [p.prompt for p in a.eval_problems()] != [p.prompt for p in other.eval_problems()]
    assert [p.prompt for p in a.train_problems()] != [p.prompt for p in other.train_problems()]
    assert not {p.prompt for p in a.train_problems()} & {p.prompt for p in a.eval_problems()}
    assert all(a.verify(p, parse_question(p.prompt).solution()).correct for p in a.eval_problems())


def test_bad_knobs_are_clear_errors():
    with pytest.raises(ValueError, match="min_steps"):
        LabTaskConfig(min_steps=4, max_steps=2)
    with pytest.raises(ValueError, match="operations"):
        LabTaskConfig(operations="+/")


def test_injected_error_rate_matches_setting():
    rng = random.Random(1)
    cfg = LabTaskConfig()
    wrong = total = 0
    for _ in range(2000):
        chain = sample_chain(rng, cfg)
        verdict = judge(chain, noisy_chain_solution(chain, rng, error_rate=0.2))
        wrong += verdict.step_correct[:-1].count(False)
        total += len(chain.ops)
    assert abs(wrong / total - 0.2) < 0.02  # an injected error is caught as exactly one wrong line


def test_char_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer()
    text = CHAIN.question() + "\n" + CHAIN.solution()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


@pytest.mark.parametrize("text", ["   ", "7+5=12\n\n\n12*3=36\n", "  \n7+5=12", "Answer: 3\n   \nx"])
def test_verifier_steps_are_the_splitters_steps(text):
    from creditrl.steps import split_steps

    assert len(judge(CHAIN, text).step_correct) == len(split_steps(text, "newline"))


@pytest.mark.parametrize(("settings", "message"), [
    ({"operations": "*"}, "no operation of '\\*' can follow the value"),
    ({"operations": "+", "value_max": 5, "start_max": 5}, "no operation of '\\+' can follow"),
    ({"operations": "+", "min_steps": 1, "max_steps": 1, "start_max": 1, "operand_max": 1},
     "too few distinct problems"),
    ({"start_max": 50, "value_max": 10}, "start_max \\(50\\) must not exceed value_max"),
])
def test_settings_that_allow_no_problems_say_so_instead_of_crashing_or_hanging(settings, message):
    with pytest.raises(ValueError, match=message):
        LabTask(LabTaskConfig(**settings, train_size=50, eval_size=5))
