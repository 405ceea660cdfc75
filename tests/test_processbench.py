import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from creditrl.cli import app
from creditrl.prm.processbench import load_processbench, predicted_error, processbench_scores
from creditrl.tasks.errors import DatasetError

FIXTURE = Path(__file__).parent / "fixtures" / "processbench_mini.json"


def test_the_fixture_reads_as_processbench_rows():
    rows = load_processbench(FIXTURE)
    assert [r.label for r in rows] == [-1, 0, 1, 2, -1, -1] and [len(r.steps) for r in rows] == [3, 3, 3, 4, 2, 3]
    assert rows[2].steps[1] == "12 - 2 = 11"


def test_json_lines_read_as_the_array_does(tmp_path):
    rows = json.loads(FIXTURE.read_text())
    lines = tmp_path / "mini.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_processbench(lines) == load_processbench(FIXTURE)


def test_predictions_and_f1_by_hand():
    assert predicted_error([0.9, 0.4, 0.2]) == 1 and predicted_error([0.6, 0.5]) == -1  # 0.5 is not below 0.5
    assert predicted_error([0.6, 0.5], threshold=0.55) == 1
    rows = load_processbench(FIXTURE)  # labels −1, 0, 1, 2, −1, −1
    # with an error: row 1 found (0), row 2 missed (2 ≠ 1), row 3 found (2): 2/3
    # without: rows 0 and 5 predicted −1, row 4 flagged at 1: 2/3; F1 = 2·(2/3)·(2/3) / (4/3) = 2/3
    report = processbench_scores(rows, [-1, 0, 2, 2, 1, -1])
    assert report["error_accuracy"] == pytest.approx(2 / 3) and report["correct_accuracy"] == pytest.approx(2 / 3)
    assert report["f1"] == pytest.approx(2 / 3) and (report["n_error"], report["n_correct"]) == (3, 3)
    assert processbench_scores(rows, [0, -1, -1, -1, 0, 0])["f1"] == 0.0


@pytest.mark.parametrize(("row", "message"), [
    ({"steps": ["a"], "label": -1}, "row 1: field 'problem'"),
    ({"problem": "p", "steps": [], "label": -1}, "row 1: field 'steps': expected a non-empty list"),
    ({"problem": "p", "steps": ["a", "b"], "label": 2}, "row 1: field 'label': expected −1 or a step index below 2"),
    ({"problem": "p", "steps": ["a"], "label": True}, "row 1: field 'label'"),
])
def test_bad_rows_name_the_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"problem": "ok", "steps": ["x"], "label": -1}, row]))
    with pytest.raises(DatasetError, match=message) as err:
        load_processbench(path)
    assert str(err.value).startswith(str(path))
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"problem": "ok", "steps": ["x"], "label": -1}\n{not json\n')
    with pytest.raises(DatasetError, match="bad.jsonl:2: not valid JSON"):
        load_processbench(lines)


def test_prm_score_reports_processbench_f1_from_a_trained_prm(tiny_lab_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from creditrl.prm.model import StepClassifier, TrainedPRM
    from creditrl.prm.processbench import step_scores

    folder = tmp_path / "prm"
    StepClassifier(AutoModelForCausalLM.from_pretrained(tiny_lab_model_dir)).save(
        folder, AutoTokenizer.from_pretrained(tiny_lab_model_dir))
    out = tmp_path / "pb.json"
    result = CliRunner().invoke(app, ["prm", "score", "--prm", str(folder), "--processbench", str(FIXTURE),
                                      "--threshold", "0.5", "--json", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = load_processbench(FIXTURE)
    # each row scored alone gives the scores of the batch (padding changes nothing)
    prm = TrainedPRM(folder)
    for row, scores in zip(rows, report["scores"]):
        assert step_scores(prm, [row])[0] == pytest.approx(scores, abs=1e-5) and len(scores) == len(row.steps)
    # the predictions and F1, recomputed from the scores by a separate loop
    predictions = []
    for scores in report["scores"]:
        below = [j for j, s in enumerate(scores) if s < 0.5]
        predictions.append(below[0] if below else -1)
    found = [p == r.label for r, p in zip(rows, predictions) if r.label != -1]
    clean = [p == -1 for r, p in zip(rows, predictions) if r.label == -1]
    err, ok = sum(found) / 3, sum(clean) / 3
    assert report["predictions"] == predictions
    assert report["f1"] == pytest.approx(0.0 if err + ok == 0 else 2 * err * ok / (err + ok))
    assert "F1" in result.output
    result = CliRunner().invoke(app, ["prm", "score", "--prm", "oracle", "--processbench", str(FIXTURE)])
    assert result.exit_code == 2 and "the oracle PRM reads the lab's step labels" in " ".join(result.output.split())

