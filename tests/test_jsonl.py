import json

import pytest

from creditrl.jsonl import append_jsonl, read_jsonl, truncate_jsonl


def _write(path, *lines):
    path.write_text("".join(lines))
    return path


def test_a_missing_file_has_no_records(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []


def test_a_torn_last_line_is_dropped(tmp_path):
    path = _write(tmp_path / "log.jsonl", '{"step": 1}\n', "\n", '{"step": 2}\n', '{"step": 3, "rew')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_a_bad_line_before_the_last_names_the_file_and_line(tmp_path):
    path = _write(tmp_path / "log.jsonl", '{"step": 1}\n', "\n", "{oops\n", '{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:3: not a JSON record"):
        read_jsonl(path)


def test_append_writes_one_record_a_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"step": 1, "text": "two\nlines"})
    append_jsonl(path, {"step": 2})
    assert path.read_text().splitlines() == [json.dumps({"step": 1, "text": "two\nlines"}), '{"step": 2}']


def test_append_after_a_torn_line_cuts_it_off(tmp_path):
    path = _write(tmp_path / "log.jsonl", '{"step": 1}\n', '{"step": 2, "rew')  # killed mid-append
    append_jsonl(path, {"step": 2})
    append_jsonl(path, {"step": 3})
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    torn_alone = _write(tmp_path / "alone.jsonl", '{"st')
    append_jsonl(torn_alone, {"step": 1})
    assert torn_alone.read_text() == '{"step": 1}\n'


def test_append_after_a_whole_last_record_without_its_newline_keeps_it(tmp_path):
    path = _write(tmp_path / "log.jsonl", "x" * 5000 + "\n", '{"step": 1}')  # longer than one block read back
    append_jsonl(path, {"step": 2})
    assert path.read_text().splitlines()[1:] == ['{"step": 1}', '{"step": 2}']


def test_truncate_keeps_the_records_up_to_a_step_and_leaves_no_temporary_file(tmp_path):
    path = _write(tmp_path / "metrics.jsonl", *(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)),
                  '{"step": 6, "lo')
    truncate_jsonl(path, 3)
    assert read_jsonl(path) == [{"step": s, "loss": s / 10} for s in range(1, 4)]
    assert path.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    truncate_jsonl(tmp_path / "absent.jsonl", 3)  # nothing to cut back: no file is made
    assert not (tmp_path / "absent.jsonl").exists()


def test_truncate_that_fails_mid_write_leaves_the_log_whole(tmp_path, monkeypatch):
    path = _write(tmp_path / "metrics.jsonl", '{"step": 1}\n', '{"step": 2}\n')
    before = path.read_text()
    write_text = type(path).write_text

    def full_disk(self, text):  # half the text reaches the disk, then the write fails
        write_text(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", full_disk)
    with pytest.raises(OSError):
        truncate_jsonl(path, 1)
    assert path.read_text() == before
