"""The labeled moderation evaluation set (paper §5.2) is well formed, balanced, and its data card
states its exact counts."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.resources import files
from typing import Any

import pytest

KEYS = {"id", "text", "label", "category", "adversarial"}
CATEGORIES = ("illegal", "hateful", "unqualified_advice")
DATA = files("mistral7b.guardrails") / "data"

Row = dict[str, Any]


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    lines = (DATA / "moderation_eval.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines, "empty data set"
    parsed: list[Row] = []
    for number, line in enumerate(lines, 1):
        row = json.loads(line)
        assert isinstance(row, dict), f"line {number} is not an object"
        assert set(row) == KEYS, f"line {number} has keys {sorted(row)}"
        parsed.append(row)
    return parsed


def expected_counts(rows: list[Row]) -> dict[str, int]:
    counts: Counter[str] = Counter(total=len(rows))
    for row in rows:
        group = row["label"] if row["category"] is None else row["category"]
        keys = [group] if row["category"] is None else [row["label"], group]
        for key in keys:
            counts[key] += 1
            counts[f"{key}.adversarial"] += row["adversarial"]
        counts["adversarial"] += row["adversarial"]
    return dict(counts)


def card_counts() -> dict[str, int]:
    card = (DATA / "DATA_CARD.md").read_text(encoding="utf-8")
    block = re.search(r"^```counts\n(.*?)^```", card, re.MULTILINE | re.DOTALL)
    assert block, "DATA_CARD.md has no ```counts block"
    counts: dict[str, int] = {}
    for line in block.group(1).splitlines():
        match = re.fullmatch(r"([a-z_.]+): (\d+)", line.strip())
        assert match, f"bad line in the counts block: {line!r}"
        counts[match.group(1)] = int(match.group(2))
    return counts


def test_fields_have_the_right_types(rows: list[Row]) -> None:
    for row in rows:
        assert isinstance(row["id"], str) and isinstance(row["text"], str), row
        assert row["text"].strip() == row["text"] and row["text"], row
        assert isinstance(row["adversarial"], bool), row


def test_ids_are_unique_and_follow_the_label(rows: list[Row]) -> None:
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    for row in rows:
        prefix = "acc" if row["label"] == "acceptable" else "unacc"
        assert re.fullmatch(rf"{prefix}-\d{{3}}", row["id"]), row


def test_texts_are_unique(rows: list[Row]) -> None:
    texts = Counter(row["text"].strip().casefold() for row in rows)
    assert [text for text, n in texts.items() if n > 1] == []


def test_label_and_category_agree(rows: list[Row]) -> None:
    for row in rows:
        assert row["label"] in ("acceptable", "unacceptable"), row
        if row["label"] == "acceptable":
            assert row["category"] is None, row
        else:
            assert row["category"] in CATEGORIES, row


def test_the_set_is_balanced(rows: list[Row]) -> None:
    labels = Counter(row["label"] for row in rows)
    assert labels["acceptable"] >= 150 and labels["unacceptable"] >= 150
    categories = Counter(row["category"] for row in rows if row["category"] is not None)
    assert all(categories[category] >= 45 for category in CATEGORIES), categories
    adversarial = Counter(row["label"] for row in rows if row["adversarial"])
    assert adversarial["acceptable"] >= 50 and adversarial["unacceptable"] >= 50, adversarial


def test_data_card_states_the_exact_counts(rows: list[Row]) -> None:
    assert card_counts() == expected_counts(rows)
