"""fastdae.files: JSON objects read back from files fastdae wrote, whatever happened to them since."""

from __future__ import annotations

import pytest

from fastdae import files


def test_a_json_object_written_reads_back_and_an_edited_one_reads_as_none(tmp_path):
    path = tmp_path / "eval.json"
    files.write_json(path, {"a": [1, 2.5, "x"], "b": {"c": None}})
    assert files.read_json_object(path) == {"a": [1, 2.5, "x"], "b": {"c": None}}


@pytest.mark.parametrize(
    "content",
    [
        b"",  # truncated to nothing
        b'{"a": 1',  # cut off mid-object
        b"\xff\xfe{}",  # not UTF-8
        b"[1, 2]",  # valid JSON, not an object
        b"[" * 100_000 + b"]" * 100_000,  # nested deep enough for a RecursionError in json
    ],
    ids=["empty", "truncated", "not-utf8", "list", "deep-nesting"],
)
def test_an_edited_json_file_reads_as_none_not_an_error(tmp_path, content):
    path = tmp_path / "classifier.json"
    path.write_bytes(content)
    assert files.read_json_object(path) is None


def test_an_absent_or_unreadable_json_file_reads_as_none(tmp_path):
    assert files.read_json_object(tmp_path / "missing.json") is None
    (tmp_path / "folder.json").mkdir()
    assert files.read_json_object(tmp_path / "folder.json") is None
