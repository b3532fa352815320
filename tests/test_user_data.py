"""training/user_data.py: a user's own file → validated, cleaned, deduplicated, split examples + report."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from flywheel.tasks import TaskSpec
from tests.timing import fastest_run_s
from training import user_data
from training.user_data import (
    DataError,
    Example,
    Splits,
    Turn,
    dedupe,
    drop_overlap,
    jaccard,
    load_examples,
    normalize_text,
    prepare_dataset,
    read_jsonl,
    shingles,
    signatures,
    split_examples,
    write_jsonl,
)

LABELS = ["positive", "negative", "neutral"]
SENTIMENT = TaskSpec(name="sentiment", kind="classification", labels=LABELS, max_seq_len=128,
                     instruction="Answer with one label.")
SUPPORT = TaskSpec(name="support", kind="generation", max_seq_len=512)
INSTRUCTION = "Classify the sentiment of this news."

_rng = random.Random(0)
WORDS = ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(3, 9))) for _ in range(3000)]


def sentence(rng: random.Random, words: tuple[int, int] = (12, 20)) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))


def count_tokens(example: Example) -> int:
    return len(" ".join(t.content for t in example.messages) + example.answer) // 4


def write_lines(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def example(prompt: str, answer: str, line: int = 1) -> Example:
    return Example(messages=[Turn(role="user", content=prompt)], answer=answer, line=line)


def everything(splits: Splits) -> str:
    return splits.model_dump_json()


# ------------------------------------------------------------------------------- the messy classification file


class Messy:
    """A JSONL file with one of every defect; `at[name]` is the line of each special row."""

    def __init__(self, tmp_path: Path) -> None:
        rng = random.Random(7)
        self.rows: list[Any] = []
        self.at: dict[str, int] = {}
        self.shapes: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.normal(rng, 0, 40)
        self.add("", "blank")  # a blank line: skipped, yet later line numbers count it
        self.add('{"prompt": "half a row", "completion": ', "malformed")
        self.add({"text": sentence(rng), "label": "positive"}, "unknown_shape")
        self.add([1, 2], "not_an_object")
        self.add({"prompt": sentence(rng), "completion": "bullish"}, "unknown_label", shape="prompt_completion")
        self.add({"instruction": INSTRUCTION, "input": sentence(rng), "output": "   "}, "empty_output", shape="alpaca")
        self.add({"prompt": "  \t ", "completion": "positive"}, "empty_input", shape="prompt_completion")
        self.add({"prompt": sentence(rng, (150, 160)), "completion": "neutral"}, "too_long", shape="prompt_completion")
        self.add({"prompt": sentence(rng), "completion": "<think>still thinking, maybe positive"}, "unclosed_think",
                 shape="prompt_completion")
        self.normal(rng, 40, 80)
        self.add(self.rows[2], "dup_exact")
        self.shapes["prompt_completion"] += 1  # line 3 is a prompt/completion row, line 4 an alpaca one
        spaced = {k: "  " + v.upper().replace(" ", "   ") if k == "input" else v for k, v in self.rows[3].items()}
        self.add(spaced, "dup_case_space", shape="alpaca")
        long_text = sentence(rng, (45, 50))
        self.add({"prompt": long_text, "completion": "positive"}, "near_original", shape="prompt_completion")
        self.labels["positive"] += 1
        changed = long_text[:100] + ("x" if long_text[100] != "x" else "y") + long_text[101:]
        self.add({"prompt": changed, "completion": "positive"}, "near_dup", shape="prompt_completion")
        self.labels["positive"] += 1  # a paraphrase: kept
        self.add({"prompt": "Call jane.doe@example.com or 13812345678 about the merger, shares fell sharply",
                  "completion": "negative"}, "pii", shape="prompt_completion")
        self.labels["negative"] += 1
        self.add({"instruction": INSTRUCTION, "input": sentence(rng), "output": "  POSITIVE "}, "label_case",
                 shape="alpaca")
        self.labels["positive"] += 1
        self.add({"prompt": sentence(rng), "completion": "<think>The tone is calm.</think>\n\nneutral"}, "think",
                 shape="prompt_completion")
        self.labels["neutral"] += 1
        self.normal(rng, 80, 120)
        self.path = write_lines(tmp_path / "news.jsonl", self.rows)
        self.kept = sum(self.labels.values())

    def add(self, row: Any, name: str, shape: str | None = None) -> None:
        self.rows.append(row)
        self.at[name] = len(self.rows)
        if shape:
            self.shapes[shape] += 1

    def normal(self, rng: random.Random, start: int, end: int) -> None:
        for i in range(start, end):
            label, text = LABELS[i % 3], sentence(rng)
            if i % 2:
                self.rows.append({"instruction": INSTRUCTION, "input": text, "output": label})
                self.shapes["alpaca"] += 1
            else:
                self.rows.append({"prompt": text, "completion": label})
                self.shapes["prompt_completion"] += 1
            self.labels[label] += 1


@pytest.fixture
def messy(tmp_path: Path) -> Messy:
    return Messy(tmp_path)


def test_messy_file_counts_every_defect_with_its_line(messy: Messy) -> None:
    splits, report = prepare_dataset(messy.path, SENTIMENT, count_tokens=count_tokens)

    at = messy.at
    assert {reason: rows.lines for reason, rows in report.invalid.items()} == {
        "malformed_json": [at["malformed"]],
        "unknown_shape": [at["unknown_shape"], at["not_an_object"]],
        "unknown_label": [at["unknown_label"]],
        "empty_output": [at["empty_output"]],
        "empty_input": [at["empty_input"]],
        "too_long": [at["too_long"]],
        "unclosed_think": [at["unclosed_think"]],
    }
    assert all(rows.count == len(rows.lines) for rows in report.invalid.values())
    assert report.rows_read == len(messy.rows) - 1  # the blank line is no row
    assert report.formats == dict(messy.shapes)
    assert (report.duplicates_removed, report.near_duplicates_kept) == (2, 1)
    assert report.rows_kept == messy.kept == 125
    assert report.label_distribution == {label: messy.labels[label] for label in LABELS}
    assert report.imbalance_warning is None
    assert report.token_lengths is not None and report.token_lengths.max > SENTIMENT.max_seq_len
    assert report.token_lengths.p50 <= report.token_lengths.p90 <= report.token_lengths.p99 <= report.token_lengths.max

    kept = splits.train + splits.val + splits.test
    by_line = {e.line: e for e in kept}
    assert len(by_line) == len(kept) == messy.kept
    assert at["near_original"] in by_line and at["near_dup"] in by_line  # a near duplicate is kept, in one split
    split_of = {e.line: name for name, rows in (("train", splits.train), ("val", splits.val), ("test", splits.test))
                for e in rows}
    assert split_of[at["near_original"]] == split_of[at["near_dup"]]
    assert at["dup_exact"] not in by_line and at["dup_case_space"] not in by_line and 3 in by_line and 4 in by_line
    assert by_line[at["label_case"]].answer == "positive"
    think = by_line[at["think"]]
    assert (think.reasoning, think.answer) == ("The tone is calm.", "neutral")
    alpaca = by_line[2]
    assert alpaca.prompt.startswith(INSTRUCTION + "\n\n") and alpaca.messages[0].role == "user"

    lines = report.lines()
    assert f"invalid malformed_json: 1 (line {at['malformed']})" in lines
    assert f"invalid unknown_shape: 2 (lines {at['unknown_shape']}, {at['not_an_object']})" in lines
    assert any(line.startswith("exact duplicates removed: 2 (") for line in lines) and "rows kept: 125" in lines


def test_personal_data_never_reaches_a_kept_example(messy: Messy) -> None:
    splits, report = prepare_dataset(messy.path, SENTIMENT)

    dumped = everything(splits)
    assert "jane.doe@example.com" not in dumped and "13812345678" not in dumped
    masked = next(e for e in splits.train + splits.val + splits.test if e.line == messy.at["pii"])
    assert masked.prompt == "Call [EMAIL] or [PHONE] about the merger, shares fell sharply"
    assert report.pii_masked_rows == 1


def test_a_too_long_row_is_dropped_before_it_is_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Masking costs time on every character: a row training would drop anyway is never masked."""
    masked_texts: list[str] = []
    monkeypatch.setattr(user_data, "mask_pii", lambda text: masked_texts.append(text) or text)
    rng = random.Random(3)
    huge = "mail a.b@example.com " + sentence(rng, (2000, 2000))
    path = write_lines(tmp_path / "long.jsonl", [{"prompt": sentence(rng), "completion": "positive"},
                                                 {"prompt": huge, "completion": "positive"}])

    examples, report = load_examples(path, SENTIMENT, count_tokens=count_tokens)
    assert len(examples) == 1 and report.invalid["too_long"].lines == [2]
    assert masked_texts and huge not in masked_texts


def test_split_is_stratified_about_70_15_15_and_seeded(messy: Messy) -> None:
    splits, report = prepare_dataset(messy.path, SENTIMENT, count_tokens=count_tokens, seed=0)
    n = messy.kept

    assert report.splits == {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    assert len(splits.test) == len(splits.val) == math.floor(0.15 * n + 0.5)
    assert len(splits.train) == n - 2 * math.floor(0.15 * n + 0.5)
    for part in (splits.val, splits.test):
        counts = Counter(e.answer for e in part)
        for label in LABELS:
            assert abs(counts[label] - 0.15 * messy.labels[label]) <= 1, (label, counts)
    train_keys = {e.key() for e in splits.train}
    assert not train_keys & {e.key() for e in splits.val + splits.test}
    assert report.leaked_removed == 0

    again, _ = prepare_dataset(messy.path, SENTIMENT, count_tokens=count_tokens, seed=0)
    other, _ = prepare_dataset(messy.path, SENTIMENT, count_tokens=count_tokens, seed=1)
    assert [e.line for e in again.test] == [e.line for e in splits.test]
    assert [e.line for e in again.train] == [e.line for e in splits.train]
    assert {e.line for e in other.test} != {e.line for e in splits.test}


def test_strict_stops_at_the_first_bad_row_naming_it(tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = [{"prompt": sentence(rng), "completion": "positive"} for _ in range(5)]
    rows.insert(3, {"prompt": sentence(rng), "completion": "bullish"})
    rows.append("{not json")
    path = write_lines(tmp_path / "strict.jsonl", rows)

    with pytest.raises(DataError, match=r"strict\.jsonl line 4: unknown_label \('bullish' is not one of"):
        prepare_dataset(path, SENTIMENT, strict=True)
    _, report = prepare_dataset(path, SENTIMENT, val_size=0, test_size=0)
    assert set(report.invalid) == {"unknown_label", "malformed_json"} and report.rows_kept == 5


def test_a_file_without_valid_rows_is_an_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ["{oops", {"prompt": "a", "completion": "bullish"}, {"x": 1}])
    with pytest.raises(DataError, match=r"no valid rows in .*bad\.jsonl: malformed_json 1 \(line 1\); "
                                        r"unknown_label 1 \(line 2\); unknown_shape 1 \(line 3\)"):
        prepare_dataset(path, SENTIMENT)
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match=r"no valid rows .* holds no rows"):
        load_examples(empty, SENTIMENT)


def test_unusable_files_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_examples(tmp_path / "data.txt", SENTIMENT)
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl", SENTIMENT)
    (tmp_path / "broken.json").write_text('[{"prompt": "a", ')
    with pytest.raises(DataError, match="not valid JSON"):
        load_examples(tmp_path / "broken.json", SENTIMENT)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="Parquet"):
        load_examples(tmp_path / "broken.parquet", SENTIMENT)
    with pytest.raises(DataError, match="cannot map to 'label'"):
        load_examples(tmp_path / "data.txt", SENTIMENT, columns={"y": "label"})


# --------------------------------------------------------------------------------------------- row shapes


def test_openai_messages_keep_system_and_turns_and_target_the_last_assistant_turn(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "You are a support agent."},
                      {"role": "user", "content": "My card was charged twice."},
                      {"role": "assistant", "content": "Which date?"},
                      {"role": "user", "content": "Yesterday,  at\tnoon."},
                      {"role": "assistant", "content": "<think>Refund the duplicate.</think>I have refunded it."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!",
                                                         "reasoning_content": "Greet back."},
                      {"role": "user", "content": "a trailing question nobody answered"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "orphan"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "{}"},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "assistant", "content": "b"}]},
    ])
    examples, report = load_examples(path, SUPPORT)

    assert report.formats == {"messages": 6}
    first, second = examples
    assert [(t.role, t.content) for t in first.messages] == [
        ("system", "You are a support agent."), ("user", "My card was charged twice."),
        ("assistant", "Which date?"), ("user", "Yesterday, at noon.")]
    assert (first.prompt, first.reasoning, first.answer) == ("Yesterday, at noon.", "Refund the duplicate.",
                                                             "I have refunded it.")
    assert [(t.role, t.content) for t in second.messages] == [("user", "Hi")]
    assert (second.reasoning, second.answer, second.line) == ("Greet back.", "Hello!", 2)
    assert {r: rows.lines for r, rows in report.invalid.items()} == {
        "empty_input": [3], "empty_output": [4], "unknown_shape": [5, 6]}
    assert first.conversation(SUPPORT)[0] == {"role": "system", "content": "You are a support agent."}
    assert second.conversation(SENTIMENT)[0] == {"role": "system", "content": "Answer with one label."}


def test_sharegpt_conversations_parse(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "share.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"},
                           {"from": "gpt", "value": "<think>2+2=4</think> 4"}]},
        {"conversations": [{"from": "user", "value": "Name a colour"}, {"from": "model", "value": "Blue"}],
         "system": "Answer in one word."},
        {"conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "</think>"}]},
    ])
    examples, report = load_examples(path, SUPPORT)

    assert report.formats == {"sharegpt": 3} and report.invalid["empty_output"].lines == [3]
    first, second = examples
    assert [t.role for t in first.messages] == ["system", "user"]
    assert (first.prompt, first.reasoning, first.answer) == ("What is 2+2?", "2+2=4", "4")
    assert [(t.role, t.content) for t in second.messages] == [("system", "Answer in one word."),
                                                               ("user", "Name a colour")]


def test_flat_shapes_and_a_reasoning_field(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "flat.jsonl", [
        {"instruction": "Translate", "input": "", "output": "ok", "system": "You translate."},
        {"instruction": "Translate", "input": "chat", "output": "cat", "think": "French to English"},
        {"input": "in", "output": "out"},
        {"prompt": "p", "completion": "c", "reasoning": "<think>r</think>"},
        {"question": "q", "answer": "a"},
    ])
    examples, report = load_examples(path, SUPPORT)

    assert report.formats == {"alpaca": 2, "input_output": 1, "prompt_completion": 1, "question_answer": 1}
    assert [(t.role, t.content) for t in examples[0].messages] == [("system", "You translate."), ("user", "Translate")]
    assert (examples[1].prompt, examples[1].reasoning) == ("Translate\n\nchat", "French to English")
    assert [(e.prompt, e.answer) for e in examples[2:]] == [("in", "out"), ("p", "c"), ("q", "a")]
    assert examples[3].reasoning == "r"


def test_csv_with_a_column_mapping_counts_header_as_line_one(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text('text,label,source\n'
                    'Great quarter for the bank,Positive,web\n'
                    '"A long review\nover two lines",negative,web\n'
                    'Profits are flat,sideways,web\n'
                    '\n'
                    'Nothing happened,neutral,app\n', encoding="utf-8-sig")
    examples, report = load_examples(path, SENTIMENT, columns={"text": "input", "label": "output"})

    assert report.formats == {"input_output": 4}
    assert report.invalid["unknown_label"].lines == [5]
    assert [(e.line, e.prompt, e.answer) for e in examples] == [
        (2, "Great quarter for the bank", "positive"), (3, "A long review\nover two lines", "negative"),
        (7, "Nothing happened", "neutral")]
    _, unmapped = load_examples(path, SENTIMENT, columns={"text": "input", "label": "output", "source": "system"})
    with pytest.raises(DataError, match="unknown_shape 4"):
        load_examples(path, SENTIMENT)
    assert unmapped.rows_kept == 3


def test_parquet_and_json_arrays_number_rows_from_one(tmp_path: Path) -> None:
    rows = [{"instruction": "Classify", "input": "Stocks soared", "output": "positive"},
            {"instruction": "Classify", "input": None, "output": "negative"},
            {"instruction": "Classify", "input": "Nothing new", "output": None},
            {"instruction": "Classify", "input": "Stocks sank", "output": "negative"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))

    for name in ("rows.parquet", "rows.json", "wrapped.json"):
        examples, report = load_examples(tmp_path / name, SENTIMENT)
        assert report.unit == "row" and report.formats == {"alpaca": 4}, name
        assert report.invalid["empty_output"].lines == [3], name
        assert [(e.line, e.prompt) for e in examples] == [(1, "Classify\n\nStocks soared"), (2, "Classify"),
                                                          (4, "Classify\n\nStocks sank")], name

    messages = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    pq.write_table(pa.Table.from_pylist(messages), tmp_path / "chat.parquet")
    (chat,), _ = load_examples(tmp_path / "chat.parquet", SUPPORT)
    assert (chat.prompt, chat.answer) == ("q", "a")


def test_a_json_file_holding_jsonl_is_read_line_by_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "lines.json", [{"prompt": "a", "completion": "positive"}, "{bad",
                                                 {"prompt": "b", "completion": "negative"}])
    examples, report = load_examples(path, SENTIMENT)
    assert [e.line for e in examples] == [1, 3] and report.invalid["malformed_json"].lines == [2]


# ---------------------------------------------------------------------------------------------- cleaning


def test_normalisation() -> None:
    assert normalize_text("ＡＢＣ　１２３\u200b x\t\t y  ") == "ABC 123 x y"
    assert normalize_text("a\r\n\r\n\r\n\r\nb \n  \n") == "a\n\nb"
    assert normalize_text("def f():\n    return  1\n") == "def f():\n    return 1"
    assert normalize_text("  \t\n ") == ""
    for text in ("1" * 4000, " " * 4000, "1 " * 2000, "1\n" * 2000, "\t \n" * 1500):
        assert len(normalize_text(text)) <= len(text)
        assert fastest_run_s(lambda text=text: normalize_text(text)) < 0.5


def test_example_must_end_with_a_user_turn() -> None:
    with pytest.raises(ValidationError, match="end with a user turn"):
        Example(messages=[Turn(role="user", content="q"), Turn(role="assistant", content="a")], answer="b", line=1)
    assert example("Q  one", "A").key() == example("q one", "a").key() != example("q one", "b").key()


# -------------------------------------------------------------------------------------------- duplicates


def test_near_duplicates_follow_the_jaccard_threshold() -> None:
    rng = random.Random(3)
    text = sentence(rng, (60, 60))
    half = text[: len(text) * 4 // 5] + " " + sentence(rng, (12, 12))
    similarity = jaccard(shingles(text), shingles(half))
    assert 0.5 < similarity < 0.85
    rows = [example(text, "a"), example(half, "a"), example(sentence(rng), "a")]

    kept, exact, near = dedupe(rows, 0.9)
    assert (len(kept), exact, near) == (3, 0, 0)
    kept, exact, near = dedupe(rows, similarity - 0.05)
    assert kept == rows and near == 1  # found and kept
    kept, _, near = dedupe([*rows, example(text, "a")], None)
    assert (len(kept), near) == (3, 0)


def test_paraphrases_that_differ_by_a_greeting_survive_dedupe_and_exact_copies_do_not(tmp_path: Path) -> None:
    """What a user saw: 31 of 96 triage rows removed as near duplicates that differed by a two-character greeting."""
    questions = {f"My order number {n} arrived broken, what should I do next": f"Ask for a refund {n}."
                 for n in range(12)}
    rows = [{"prompt": f"{greeting}{q}?", "completion": a} for q, a in questions.items() for greeting in ("", "Hi ")]
    copies = [dict(rows[0]), {"prompt": rows[1]["prompt"].upper(), "completion": rows[1]["completion"]}]
    splits, report = prepare_dataset(write_lines(tmp_path / "greetings.jsonl", rows + copies),
                                     TaskSpec(name="support", kind="generation"), val_size=4, test_size=4)

    assert report.duplicates_removed == 2 and report.rows_kept == 24
    assert report.near_duplicates_kept >= 12
    assert any(line.startswith("near duplicates kept:") for line in report.lines())
    assert any(line.startswith("exact duplicates removed: 2 (") for line in report.lines())
    splits_of: dict[str, set[str]] = {}
    for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        for e in part:
            splits_of.setdefault(e.prompt.removeprefix("Hi "), set()).add(name)
    assert len(splits_of) == 12 and all(len(names) == 1 for names in splits_of.values())  # never learned and tested


def test_signatures_estimate_jaccard() -> None:
    rng = random.Random(4)
    base = sentence(rng, (80, 80))
    for cut in (0.3, 0.6, 0.9):
        other = base[: int(len(base) * cut)] + " " + sentence(rng, (int(80 * (1 - cut)), int(80 * (1 - cut))))
        sig = signatures([base, "x", other])
        estimate = float((sig[0] == sig[2]).mean())
        assert abs(estimate - jaccard(shingles(base), shingles(other))) < 0.2, cut
    assert (signatures([base])[0] == signatures(["abc", base])[1]).all()


def test_dedupe_finds_the_near_duplicates_among_20_000_rows() -> None:
    """Its speed is `flywheel bench data`'s to measure; here, what it finds at that size."""
    rng = random.Random(5)
    rows = [example(sentence(rng, (15, 40)), LABELS[i % 3], i + 1) for i in range(20_000)]
    for i in range(0, 20_000, 20):  # 1 000 near duplicates: one character differs
        prompt = rows[i].prompt
        rows[i + 1] = example(prompt[:40] + ("#" if prompt[40] != "#" else "%") + prompt[41:], rows[i].answer, i + 2)
    kept, exact, near = dedupe(rows, 0.9)
    assert exact == 0 and 900 <= near <= 1_000 and len(kept) == 20_000


# ------------------------------------------------------------------------------------------------ splits


def _labelled(counts: dict[str, int]) -> list[Example]:
    rng = random.Random(6)
    labels = [label for label, n in counts.items() for _ in range(n)]
    return [example(sentence(rng), label, i) for i, label in enumerate(labels)]


def test_split_sizes_counts_and_small_labels() -> None:
    rows = _labelled({"positive": 30, "negative": 3, "neutral": 1})
    splits = split_examples(rows, SENTIMENT, val_size=0.15, test_size=0.15)
    for part in (splits.val, splits.test):
        assert Counter(e.answer for e in part)["negative"] == 1
    assert Counter(e.answer for e in splits.train) == {"positive": 30 - len(splits.val) - len(splits.test) + 2,
                                                       "negative": 1, "neutral": 1}
    counted = split_examples(rows, SENTIMENT, val_size=10, test_size=5.0)
    assert (len(counted.train), len(counted.val), len(counted.test)) == (19, 10, 5)
    none = split_examples(rows, SENTIMENT, val_size=0, test_size=0)
    assert (len(none.train), none.val, none.test) == (34, [], [])
    for bad in ({"val_size": 1.5}, {"test_size": -1}, {"val_size": 0.6, "test_size": 0.4}, {"val_size": 40}):
        with pytest.raises(DataError):
            split_examples(rows, SENTIMENT, **bad)


def test_generation_split_and_leak_removal() -> None:
    rng = random.Random(8)
    rows = [example(sentence(rng), sentence(rng, (3, 5)), i) for i in range(100)]
    splits = split_examples(rows, SUPPORT, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.leaked_removed) == (70, 15, 15, 0)

    doubled = rows + [example(e.prompt, e.answer, 1000 + i) for i, e in enumerate(rows)]  # not deduplicated
    splits = split_examples(doubled, SUPPORT, seed=3)
    train_keys = {e.key() for e in splits.train}
    assert splits.leaked_removed == 0  # a row and its copy share a prompt: they go to one split together
    assert not train_keys & {e.key() for e in splits.val + splits.test}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (140, 30, 30)
    with pytest.raises(DataError, match="generation task"):
        split_examples(rows, SUPPORT, balance=True)


def _prompts(*parts: list[Example]) -> list[set[str]]:
    return [{e.prompt_key() for e in part} for part in parts]


def test_split_keeps_each_prompt_in_one_split_whatever_its_answers(tmp_path: Path) -> None:
    rng = random.Random(11)
    questions = [sentence(rng, (10, 14)) for _ in range(60)]
    rows = [{"prompt": q if k % 2 else q.upper() + "  ", "completion": sentence(rng, (3, 6))}
            for q in questions for k in range(3)]  # three different answers per prompt (one spelled louder)
    near = [{"prompt": q[:-1] + "#", "completion": sentence(rng, (3, 6))} for q in questions[:10]]
    path = write_lines(tmp_path / "answers.jsonl", rows + near)

    splits, report = prepare_dataset(path, SUPPORT, seed=4)

    assert report.duplicates_removed == 0 and report.rows_kept == len(rows + near)  # the rows differ by their answers
    train, val, test = _prompts(splits.train, splits.val, splits.test)
    assert not train & test and not train & val and not val & test
    for q in questions[:10]:  # a near-duplicate prompt goes where its original goes
        assert [q in part for part in (train, val, test)] == [q[:-1] + "#" in part for part in (train, val, test)]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 190 and report.leaked_removed == 0
    assert 24 <= len(splits.test) <= 33 and 24 <= len(splits.val) <= 33  # whole groups of 3 or 4 make up 15 %


def test_classification_split_groups_prompts_across_labels() -> None:
    rng = random.Random(12)
    rows = [example(sentence(rng), LABELS[i % 3], i) for i in range(90)]
    rows += [example(e.prompt, LABELS[(i + 1) % 3], 100 + i) for i, e in enumerate(rows[:30])]  # relabelled
    splits = split_examples(rows, SENTIMENT, seed=5)
    train, val, test = _prompts(splits.train, splits.val, splits.test)
    assert not train & test and not train & val and not val & test
    assert len(splits.train) + len(splits.val) + len(splits.test) == 120
    for part in (splits.val, splits.test):
        assert set(Counter(e.answer for e in part)) == set(LABELS)
    assert set(Counter(e.answer for e in splits.train)) == set(LABELS)


def test_balance_oversamples_train_only(tmp_path: Path) -> None:
    rows = _labelled({"positive": 60, "negative": 10, "neutral": 6})
    path = write_lines(tmp_path / "skewed.jsonl", [{"prompt": e.prompt, "completion": e.answer} for e in rows])

    plain, report = prepare_dataset(path, SENTIMENT, seed=2)
    balanced, balanced_report = prepare_dataset(path, SENTIMENT, seed=2, balance=True)

    assert report.imbalance_warning and "--balance" in report.imbalance_warning and "10.0x" in report.imbalance_warning
    assert "oversampled" in (balanced_report.imbalance_warning or "")
    train = Counter(e.answer for e in balanced.train)
    assert set(train.values()) == {Counter(e.answer for e in plain.train)["positive"]}
    assert {e.line for e in balanced.train} == {e.line for e in plain.train}
    assert [e.line for e in balanced.val] == [e.line for e in plain.val]
    assert [e.line for e in balanced.test] == [e.line for e in plain.test]
    assert balanced.oversampled == balanced_report.oversampled == len(balanced.train) - len(plain.train) > 0
    assert balanced_report.splits["train"] == len(balanced.train)


def test_eval_file_becomes_the_test_split_without_train_rows(tmp_path: Path) -> None:
    rng = random.Random(9)
    train_rows = [{"prompt": sentence(rng, (30, 40)), "completion": LABELS[i % 3]} for i in range(40)]
    fresh = [{"prompt": sentence(rng, (30, 40)), "completion": LABELS[i % 3]} for i in range(6)]
    near = dict(train_rows[7], prompt=train_rows[7]["prompt"][:-1] + "#")
    eval_rows = [*fresh, train_rows[0], train_rows[5], near, fresh[0]]
    data = write_lines(tmp_path / "train.jsonl", train_rows)
    heldout = write_lines(tmp_path / "golden.jsonl", eval_rows)

    splits, report = prepare_dataset(data, SENTIMENT, eval_file=heldout, val_size=0)

    assert sorted(e.line for e in splits.test) == [1, 2, 3, 4, 5, 6]
    assert len(splits.train) == 40 and splits.val == []
    assert report.leaked_removed == 3 and report.heldout is not None
    assert (report.heldout.duplicates_removed, report.heldout.leaked_removed) == (1, 3)
    assert report.splits == {"train": 40, "val": 0, "test": 6}
    assert any(line.startswith("eval file: ") for line in report.lines())

    only_train = write_lines(tmp_path / "copy.jsonl", train_rows[:3])
    with pytest.raises(DataError, match="nothing is left to test on"):
        prepare_dataset(data, SENTIMENT, eval_file=only_train, val_size=0)


def test_eval_file_loses_prompts_that_train_or_validation_hold(tmp_path: Path) -> None:
    rng = random.Random(13)
    rows = [{"prompt": sentence(rng, (20, 30)), "completion": sentence(rng, (3, 6))} for _ in range(40)]
    data = write_lines(tmp_path / "train.jsonl", rows)
    fresh = [{"prompt": sentence(rng, (20, 30)), "completion": "fresh"} for _ in range(5)]
    splits, _ = prepare_dataset(data, SUPPORT, val_size=8, test_size=0)
    in_val, in_train = splits.val[0], splits.train[0]
    eval_rows = [*fresh, {"prompt": in_val.prompt, "completion": "another answer"},
                 {"prompt": in_train.prompt.upper(), "completion": "yet another answer"}]
    heldout = write_lines(tmp_path / "eval.jsonl", eval_rows)

    splits, report = prepare_dataset(data, SUPPORT, val_size=8, eval_file=heldout)

    assert [e.answer for e in splits.test] == ["fresh"] * 5
    assert report.heldout is not None and report.heldout.leaked_removed == report.leaked_removed == 2


def test_drop_overlap() -> None:
    rng = random.Random(10)
    train = [example(sentence(rng, (30, 30)), "a", i) for i in range(5)]
    near = example(train[1].prompt[:-2] + "zz", "a", 9)
    heldout = [example(train[0].prompt.upper(), "a", 7), example("something else entirely", "a", 8), near]
    assert drop_overlap(train, heldout) == ([heldout[1], near], 1)
    assert drop_overlap(train, heldout, near_dup_threshold=0.9) == ([heldout[1]], 2)


# ------------------------------------------------------------------------------------------- JSONL files


def test_jsonl_round_trip_is_atomic(tmp_path: Path) -> None:
    chat = [Turn(role="system", content="s"), Turn(role="user", content="q2")]
    rows = [example("q1", "a1", 1), Example(messages=chat, reasoning="r", answer="a2", line=2)]
    path = tmp_path / "golden" / "test.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows

    def failing() -> Any:
        yield rows[0]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl(path, failing())
    assert read_jsonl(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["test.jsonl"]
    path.write_text(rows[0].model_dump_json() + "\n{}\n")
    with pytest.raises(DataError, match=r"test\.jsonl line 2"):
        read_jsonl(path)
