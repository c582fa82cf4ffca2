"""Kept JSON parts: an answer written around them is json.dumps's, byte for byte,
and a part is encoded again exactly when it changed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from boincd_containers.core import jsontext
from boincd_containers.core.jsontext import KeptJSON

ODD_VALUES: list[Any] = [
    {},
    [],
    {"a": [], "b": {}},
    {"é": 'ü\0\n"', "n": None, "t": True, "f": 1.5e300, "i": -3},
    {"nan": float("nan"), "inf": float("-inf")},
    {1: "int key", "s": "str key"},  # json.dumps turns the key into "1"
    [[1, [2, [3, [4]]]], {"x": {"y": {"z": [5]}}}],
    ("a", "tuple"),
    "just a string",
]


@pytest.mark.parametrize("value", ODD_VALUES)
def test_without_kept_parts_it_writes_what_json_dumps_writes(value: Any) -> None:
    assert KeptJSON().dumps(value) == json.dumps(value)


def test_an_answer_with_kept_parts_is_json_dumps_of_it() -> None:
    kept = KeptJSON()
    tasks = [kept.keep(("task", i), {"result": f"r{i}", "cpu": i * 0.5}) for i in range(3)]
    items = kept.keep("items", [{"ref": "busybox", "size": 1}])
    answer = {"daemon": {"v": 1}, "tasks": tasks, "images": {"count": 1, "items": items}}
    assert kept.dumps(answer) == json.dumps(answer)
    # A field that reads like anything else in the answer changes nothing.
    answer["tasks"].append({"progress": json.dumps(tasks[0])})
    assert kept.dumps(answer) == json.dumps(answer)


def test_an_unchanged_part_keeps_its_text_and_a_changed_one_is_encoded_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kept = KeptJSON()
    first = kept.keep("t", {"cpu": 1.0, "state": "running"})
    calls: list[object] = []
    real_dumps = json.dumps

    def counting(value: object, **kw: Any) -> str:
        calls.append(value)
        return real_dumps(value, **kw)

    monkeypatch.setattr(jsontext.json, "dumps", counting)
    again = kept.keep("t", {"cpu": 1.0, "state": "running"})
    assert again is first, "an equal part is the kept one"
    assert kept.dumps([again]) == '[{"cpu": 1.0, "state": "running"}]'
    assert {"cpu": 1.0, "state": "running"} not in calls, "its text was not made again"
    changed = kept.keep("t", {"cpu": 2.0, "state": "running"})
    assert changed is not first
    assert kept.dumps([changed]) == '[{"cpu": 2.0, "state": "running"}]'


def test_parts_not_retained_are_forgotten() -> None:
    kept = KeptJSON()
    old = kept.keep("gone", {"a": 1})
    kept.keep("stays", {"b": 2})
    kept.retain({"stays"})
    assert len(kept) == 1
    assert kept.keep("gone", {"a": 1}) is not old, "a forgotten part starts anew"


def test_kept_parts_deeper_than_the_depth_are_encoded_whole() -> None:
    kept = KeptJSON()
    part = kept.keep("deep", {"x": 1})
    value = {"a": {"b": {"c": part}}}
    assert kept.dumps(value) == json.dumps(value)
    assert kept.dumps(value, depth=5) == json.dumps(value)
