"""A company's own dataset in: read → validate → clean → dedupe → split, with a report of every step.

Files: JSONL/NDJSON (streamed line by line), JSON (an array of objects, or `{"data": [...]}`), CSV and
Parquet. Each row's shape is detected on its own, so one file may mix them:

- alpaca `{instruction, input?, output, system?}`, `{input, output}`, `{prompt, completion}`,
  `{question, answer}`;
- OpenAI `{messages: [{role, content}, ...]}` and sharegpt `{conversations: [{from, value}, ...]}`:
  the last assistant turn is the target, everything before it the conversation (which must hold a
  user turn, and ends with one).

`columns` renames the user's fields to those names first (`{"text": "input", "label": "output"}`).
A `reasoning` (or `think`) field is the R1 reasoning; `<think>…</think>` inside an answer is split off
into it.

Bad rows are counted by type with their line numbers and skipped (`strict` stops at the first). Every
text is NFKC- and whitespace-normalised, then PII-masked before anything is kept. Exact copies
(`Example.key`) are removed; near duplicates (MinHash over character 5-grams: signatures computed
with numpy for all rows at once, candidates found by datasketch's MinHashLSH and confirmed by the
shingles' Jaccard) are counted and kept: they are paraphrases a small dataset needs. The split is
seeded, stratified by label for classification, and grouped by prompt: rows whose prompts are equal
(folded) or near-duplicates go to one split together, so no prompt (or paraphrase of it) lands in both
train and test. A held-out `--eval-file` loses the
rows whose prompt train or validation holds.

Line numbers are 1-based: the physical line of JSONL and CSV rows (a CSV header is line 1), the
position in the array or table for JSON and Parquet rows.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field, model_validator

from feedback.pii import mask_pii
from flywheel.r1 import THINK, THINK_END, split_reasoning
from flywheel.tasks import TaskSpec

log = logging.getLogger("flywheel.user_data")

Role = Literal["system", "user", "assistant"]
Shape = Literal["alpaca", "input_output", "prompt_completion", "question_answer", "messages", "sharegpt"]
InvalidReason = Literal[
    "malformed_json", "unknown_shape", "empty_output", "empty_input", "unknown_label", "too_long", "unclosed_think"
]
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
# The field names `columns` may map to: the ones the row shapes are detected by.
CANONICAL_FIELDS = ("instruction", "input", "output", "prompt", "completion", "question", "answer", "messages",
                    "conversations", "system", "reasoning", "think")
LISTED_LINES = 20  # line numbers kept per invalid reason
DEFAULT_NEAR_DUP_THRESHOLD = 0.9
NUM_PERM = 64
SHINGLE = 5  # characters per shingle


class DataError(Exception):
    """The user's data cannot be used as given; the message says where and why (a CLI prints it as is)."""


# ---------------------------------------------------------------------------------------------- models


class Turn(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Role
    content: str


class Example(BaseModel):
    """One training row: the conversation before the target answer, and the answer (with its reasoning)."""

    model_config = ConfigDict(frozen=True)

    messages: list[Turn] = Field(description="Optional system turn, earlier turns, ending with a user turn.")
    reasoning: str = ""
    answer: str
    line: int = Field(description="1-based line (JSONL/CSV) or row (JSON/Parquet) of the source file.")

    @model_validator(mode="after")
    def _ends_with_user(self) -> Example:
        if not self.messages or self.messages[-1].role != "user":
            raise ValueError("messages must end with a user turn")
        return self

    @property
    def prompt(self) -> str:
        """The last user turn: what the answer answers."""
        return self.messages[-1].content

    def key(self) -> str:
        """Messages and answer, case- and whitespace-folded: equal keys are exact duplicates."""
        parts = [f"{t.role}\x1f{_fold(t.content)}" for t in self.messages]
        return "\x1e".join([*parts, f"assistant\x1f{_fold(self.answer)}"])

    def prompt_key(self) -> str:
        """The prompt, folded: rows with equal prompt keys ask the same thing, whatever they answer."""
        return _fold(self.prompt)

    def conversation(self, task: TaskSpec) -> list[dict[str, str]]:
        """The messages as chat-template dicts, with the task's instruction as system turn when none."""
        return task.conversation([t.model_dump() for t in self.messages])


class Splits(BaseModel):
    train: list[Example]
    val: list[Example]
    test: list[Example]
    leaked_removed: int = Field(0, description="Held-out rows dropped because train (or val) holds their prompt.")
    oversampled: int = Field(0, description="train rows added by `balance`")


class InvalidRows(BaseModel):
    count: int = 0
    lines: list[int] = Field(default_factory=list, description=f"The first {LISTED_LINES} line numbers.")


class TokenLengths(BaseModel):
    """Token counts of the rows that passed every other check (over-long ones included)."""

    p50: int
    p90: int
    p99: int
    max: int


class DataReport(BaseModel):
    """What happened to the user's file, row counts first; `lines()` prints it."""

    file: str
    unit: Literal["line", "row"] = Field("line", description="What the numbers in `invalid` count.")
    formats: dict[str, int] = Field(default_factory=dict, description="Rows per detected shape.")
    rows_read: int = 0
    rows_kept: int = Field(0, description="Valid rows left after deduplication.")
    invalid: dict[str, InvalidRows] = Field(default_factory=dict)
    duplicates_removed: int = Field(0, description="Exact copies removed: the same turns and answer up to case "
                                    "and spacing.")
    near_duplicates_kept: int = Field(0, description="Near duplicates of an earlier row (paraphrases) kept, in "
                                      "the same split as the rows they resemble.")
    pii_masked_rows: int = 0
    leaked_removed: int = 0
    label_distribution: dict[str, int] = Field(default_factory=dict, description="Classification: kept rows.")
    imbalance_warning: str | None = None
    token_lengths: TokenLengths | None = None
    splits: dict[str, int] = Field(default_factory=dict)
    oversampled: int = 0
    heldout: DataReport | None = Field(None, description="The eval file's own report, when one was given.")

    def lines(self) -> list[str]:
        """One fact per line, for people."""
        out = [f"file: {self.file}"]
        shapes = ", ".join(f"{shape} {n}" for shape, n in self.formats.items())
        out.append(f"rows read: {self.rows_read}" + (f" ({shapes})" if shapes else ""))
        for reason, rows in self.invalid.items():
            out.append(f"invalid {reason}: {rows.count} ({_listed(self.unit, rows)})")
        if self.duplicates_removed:
            out.append(f"exact duplicates removed: {self.duplicates_removed} (the same turns and answer up to case "
                       "and spacing)")
        if self.near_duplicates_kept:
            out.append(f"near duplicates kept: {self.near_duplicates_kept} (paraphrases of another row: none removed, "
                       "each put in the same split as the rows it resembles)")
        if self.pii_masked_rows:
            out.append(f"rows with personal data masked: {self.pii_masked_rows}")
        out.append(f"rows kept: {self.rows_kept}")
        if self.label_distribution:
            out.append("labels: " + ", ".join(f"{label} {n}" for label, n in self.label_distribution.items()))
        if self.imbalance_warning:
            out.append(f"warning: {self.imbalance_warning}")
        if self.token_lengths:
            t = self.token_lengths
            out.append(f"tokens per row: p50 {t.p50}, p90 {t.p90}, p99 {t.p99}, max {t.max}")
        if self.splits:
            out.append("splits: " + ", ".join(f"{name} {n}" for name, n in self.splits.items()))
        if self.leaked_removed:
            out.append(f"held-out rows dropped because train or validation holds their prompt: {self.leaked_removed}")
        if self.oversampled:
            out.append(f"train rows added by --balance: {self.oversampled}")
        if self.heldout is not None:
            out += [f"eval {line}" for line in self.heldout.lines()]
        return out


def _listed(unit: str, rows: InvalidRows) -> str:
    more = ", …" if rows.count > len(rows.lines) else ""
    return f"{unit}{'s' if rows.count > 1 else ''} " + ", ".join(map(str, rows.lines)) + more


# --------------------------------------------------------------------------------------------- reading


class _RowError(Exception):
    """One row is unusable: counted under `reason`; `detail` never holds the row's text."""

    def __init__(self, reason: InvalidReason, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
# (line, parsed object or None, why it could not be parsed)
_RawRow = tuple[int, Any, str | None]


def check_readable(path: str | os.PathLike[str]) -> None:
    """DataError unless `path` is a file of a supported type that can be opened: checked before any work."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
                        f"use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _open_rows(path: Path) -> tuple[Literal["line", "row"], Iterator[_RawRow]]:
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "line", _jsonl_rows(path)
    if suffix == ".csv":
        return "line", _csv_rows(path)
    if suffix == ".parquet":
        return "row", _parquet_rows(path)
    try:
        data = json.loads(_read_bytes(path))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line in a .json file: read it as JSONL
            return "line", _jsonl_rows(path)
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows or {{\"data\": [...]}}, "
                        f"got a JSON {_JSON_TYPES.get(type(data), type(data).__name__)}")
    return "row", ((i, row, None) for i, row in enumerate(data, 1))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _jsonl_rows(path: Path) -> Iterator[_RawRow]:
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    yield number, json.loads(raw.decode("utf-8")), None
                except json.JSONDecodeError as exc:
                    yield number, None, f"{exc.msg} at character {exc.pos + 1}"
                except UnicodeDecodeError as exc:
                    yield number, None, f"not UTF-8: {exc.reason}"
                except RecursionError:
                    yield number, None, "nested too deeply"
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _csv_rows(path: Path) -> Iterator[_RawRow]:
    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # long documents are reported as too_long, not as a CSV error
    start = 1
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            while True:
                start = reader.line_num + 1
                cells = next(reader, None)
                if cells is None:
                    return
                if any(cell.strip() for cell in cells):
                    yield start, {name: cell for name, cell in zip(header, cells, strict=False) if name}, None
    except csv.Error as exc:
        raise DataError(f"{path} line {start}: not valid CSV ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} near line {start}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(path: Path) -> Iterator[_RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read it as Parquet ({exc})") from None


# ------------------------------------------------------------------------------------------ row shapes

# (role, content) pairs before the target, the reasoning, the target answer
_Parsed = tuple[list[tuple[Role, str]], str, str]

_ROLES: dict[str, Role] = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
}
_FLAT_SHAPES: tuple[tuple[Shape, str, str], ...] = (
    ("alpaca", "instruction", "output"),
    ("prompt_completion", "prompt", "completion"),
    ("question_answer", "question", "answer"),
    ("input_output", "input", "output"),
)
_SHAPE_FIELDS: tuple[tuple[Shape, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    *((shape, (prompt, answer)) for shape, prompt, answer in _FLAT_SHAPES),
)


def check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    """The user's `columns` mapping, checked: DataError names a target that is not a field we read."""
    columns = dict(columns or {})
    wrong = sorted(target for target in columns.values() if target not in CANONICAL_FIELDS)
    if wrong:
        raise DataError(f"columns: cannot map to {', '.join(map(repr, wrong))}; "
                        f"map your fields to {', '.join(CANONICAL_FIELDS)}")
    return columns


def _rename(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    if not columns:
        return row
    renamed = {key: value for key, value in row.items() if key not in columns}
    renamed.update({columns[key]: value for key, value in row.items() if key in columns})
    return renamed


def _filled(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value) and not value.isspace()
    return value is not None and value != []


def _detect(row: dict[str, Any]) -> Shape:
    """The first shape whose fields are all filled; else the first whose fields are all there (a CSV or
    Parquet file has every column in every row, empty where a row of another shape has no value)."""
    filled = {key for key, value in row.items() if _filled(value)}
    for fields_of in (filled, row):
        for shape, fields in _SHAPE_FIELDS:
            if all(field in fields_of for field in fields):
                return shape
    fields = ", ".join(sorted(map(str, row))[:8]) or "none"
    raise _RowError("unknown_shape", f"fields {fields}; expected instruction/output, input/output, "
                    "prompt/completion, question/answer, messages or conversations (or map yours with columns)")


def _text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _RowError("unknown_shape", f"field {field!r} holds a {type(value).__name__}, not text")


def _row_reasoning(row: dict[str, Any]) -> str:
    return _text(row.get("reasoning", row.get("think")), "reasoning")


def _parse(shape: Shape, row: dict[str, Any]) -> _Parsed:
    system = _text(row.get("system"), "system")
    if shape in ("messages", "sharegpt"):
        turns, reasoning, answer = _parse_turns(row[shape if shape == "messages" else "conversations"])
        if system and not any(role == "system" for role, _ in turns):
            turns.insert(0, ("system", system))
        return turns, reasoning or _row_reasoning(row), answer
    _, prompt_field, answer_field = next(s for s in _FLAT_SHAPES if s[0] == shape)
    prompt = _text(row[prompt_field], prompt_field)
    if shape == "alpaca":
        extra = _text(row.get("input"), "input")
        prompt = f"{prompt}\n\n{extra}" if prompt.strip() and extra.strip() else prompt + extra
    turns = [("system", system)] if system else []
    return [*turns, ("user", prompt)], _row_reasoning(row), _text(row[answer_field], answer_field)


def _parse_turns(items: Any) -> _Parsed:
    if isinstance(items, str):  # a JSON list in a CSV cell
        try:
            items = json.loads(items)
        except (json.JSONDecodeError, RecursionError):
            raise _RowError("malformed_json", "the conversation field is not a JSON list") from None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise _RowError("unknown_shape", "the conversation must be a list of {role, content} objects")
    turns: list[tuple[Role, str]] = []
    target = -1
    reasoning = ""
    for item in items:
        name = item.get("role", item.get("from"))
        role = _ROLES.get(str(name).lower()) if name is not None else None
        if role is None:
            raise _RowError("unknown_shape", f"unsupported role {name!r}")
        content = item.get("content", item.get("value"))
        if isinstance(content, list):  # OpenAI content parts
            content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        turns.append((role, _text(content, "content")))
        if role == "assistant":
            target = len(turns) - 1
            reasoning = _text(item.get("reasoning_content", item.get("reasoning")), "reasoning")
    if target < 0:
        raise _RowError("empty_output", "the conversation has no assistant turn")
    before = turns[:target]
    if not any(role == "user" for role, _ in before):
        raise _RowError("empty_input", "no user turn before the last assistant turn")
    if before[-1][0] != "user":
        raise _RowError("unknown_shape", f"the turn before the last assistant turn is {before[-1][0]}, not user")
    return before, reasoning, turns[target][1]


# -------------------------------------------------------------------------------------------- cleaning

# Zero-width characters and C0/C1 controls that are not whitespace: dropped.
_DROP = dict.fromkeys([*range(0x00, 0x09), *range(0x0E, 0x20), *range(0x7F, 0x85), *range(0x86, 0xA0),
                       0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF])
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFKC; controls and zero-width characters dropped; inside each line runs of whitespace become one
    space (a line's indentation is kept, for code); trailing spaces, blank-line runs and the ends trimmed."""
    text = unicodedata.normalize("NFKC", text).translate(_DROP)
    lines = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        body = line.strip()
        indent = line[: len(line) - len(line.lstrip())] if body else ""
        lines.append(indent + " ".join(body.split()))
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def normalized_prompt(text: str) -> str:
    """A prompt as the split and the golden set compare prompts: normalised as rows are, then folded."""
    return _fold(normalize_text(text))


def _label_key(label: str) -> str:
    return normalize_text(label).casefold()


def _split_think(reasoning: str, answer: str) -> tuple[str, str]:
    if THINK_END in answer:
        inner, answer = split_reasoning(answer)
        reasoning = inner or reasoning
    if THINK in answer or THINK_END in answer:
        raise _RowError("unclosed_think", f"the answer holds {THINK} without a matching {THINK_END}")
    return reasoning.replace(THINK, "").replace(THINK_END, "").strip(), answer


def _clean(parsed: _Parsed, line: int, task: TaskSpec, labels: dict[str, str]) -> Example:
    """The row normalised and checked, not yet masked (see `_masked`)."""
    turns, reasoning, answer = parsed
    turns = [(role, normalize_text(content)) for role, content in turns]
    turns = [(role, content) for role, content in turns if content or role != "system"]
    reasoning, answer = _split_think(normalize_text(reasoning), normalize_text(answer))
    if not answer:
        raise _RowError("empty_output")
    if not turns[-1][1]:
        raise _RowError("empty_input")
    if task.kind == "classification":
        label = labels.get(_label_key(answer))
        if label is None:
            raise _RowError("unknown_label", f"{mask_pii(answer)[:40]!r} is not one of {', '.join(task.labels)}")
        answer = label
    messages = [Turn(role=role, content=content) for role, content in turns]
    return Example(messages=messages, reasoning=reasoning, answer=answer, line=line)


def _masked(example: Example) -> Example:
    """`example` with personal data masked in every text."""
    return example.model_copy(update={
        "messages": [turn.model_copy(update={"content": mask_pii(turn.content)}) for turn in example.messages],
        "reasoning": mask_pii(example.reasoning),
        "answer": mask_pii(example.answer),
    })


def _percentiles(lengths: list[int]) -> TokenLengths | None:
    if not lengths:
        return None
    ordered = sorted(lengths)

    def at(p: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return TokenLengths(p50=at(0.5), p90=at(0.9), p99=at(0.99), max=ordered[-1])


def load_examples(
    path: str | os.PathLike[str],
    task: TaskSpec,
    *,
    columns: dict[str, str] | None = None,
    strict: bool = False,
    count_tokens: Callable[[Example], int] | None = None,
) -> tuple[list[Example], DataReport]:
    """The file's valid rows, cleaned and masked (not deduplicated), and the report of reading them.

    Bad rows are counted and skipped; with `strict` the first raises DataError. `count_tokens` (None
    skips the check) measures a row before masking (which only shortens personal data to a token), so a
    too_long row (over `task.max_seq_len`) is dropped before any work is spent masking it.
    Raises DataError when the file cannot be read or holds no valid row.
    """
    path = Path(path)
    mapping = check_columns(columns)
    unit, rows = _open_rows(path)
    report = DataReport(file=str(path), unit=unit)
    labels = {_label_key(label): label for label in reversed(task.labels)}  # the first spelling wins
    examples: list[Example] = []
    lengths: list[int] = []
    formats: Counter[str] = Counter()
    for line, row, error in rows:
        report.rows_read += 1
        try:
            if error is not None:
                raise _RowError("malformed_json", error)
            if not isinstance(row, dict):
                raise _RowError("unknown_shape", f"a JSON {_JSON_TYPES.get(type(row), 'value')}, not an object")
            row = _rename(row, mapping)
            shape = _detect(row)
            formats[shape] += 1
            cleaned = _clean(_parse(shape, row), line, task, labels)
            if count_tokens is not None:
                n = count_tokens(cleaned)
                lengths.append(n)
                if n > task.max_seq_len:
                    raise _RowError("too_long", f"{n} tokens > max_seq_len {task.max_seq_len}")
            example = _masked(cleaned)
        except _RowError as exc:
            if strict:
                raise DataError(f"{path} {unit} {line}: {exc.reason}" + (f" ({exc.detail})" if exc.detail else "")
                                + "; fix it or run without --strict to skip bad rows") from None
            rejected = report.invalid.setdefault(exc.reason, InvalidRows())
            rejected.count += 1
            if len(rejected.lines) < LISTED_LINES:
                rejected.lines.append(line)
            continue
        report.pii_masked_rows += example != cleaned
        examples.append(example)
    report.formats = dict(formats)
    report.rows_kept = len(examples)
    report.token_lengths = _percentiles(lengths)
    if not examples:
        why = "; ".join(f"{reason} {rows.count} ({_listed(unit, rows)})" for reason, rows in report.invalid.items())
        raise DataError(f"no valid rows in {path}: {why or 'the file holds no rows'}")
    return examples, report


# A file looks like classification when its answers are a few short, often repeated texts.
MAX_INFERRED_LABELS = 20
MAX_LABEL_CHARS = 40


def infer_task(path: str | os.PathLike[str], *, columns: dict[str, str] | None = None,
               ) -> tuple[Literal["classification", "generation"], list[str]]:
    """(kind, labels) the file's rows look like: classification, labels by frequency, when there are 2 to
    MAX_INFERRED_LABELS distinct short one-line answers (no comma) and at least three rows per answer;
    else generation. DataError when the file holds no valid row."""
    probe = TaskSpec(name="inferred", kind="generation")
    examples, _ = load_examples(path, probe, columns=columns)
    counts = Counter(e.answer for e in examples)
    labels = [answer for answer, _ in counts.most_common()]
    if (2 <= len(labels) <= MAX_INFERRED_LABELS and len(examples) >= 3 * len(labels)
            and all(len(label) <= MAX_LABEL_CHARS and "\n" not in label and "," not in label for label in labels)):
        return "classification", labels
    return "generation", []


# ------------------------------------------------------------------------------------------ duplicates

_POLY = np.uint64(0x100000001B3)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)
# Affine permutations of well-mixed 32-bit shingle hashes, a * x + b mod 2^32 (a odd): datasketch's
# default scheme, computed here for all of a chunk's shingles at once instead of row by row.
_PERM_RNG = np.random.default_rng(20240601)
_PERM_A = _PERM_RNG.integers(0, 1 << 32, NUM_PERM, dtype=np.uint32) | np.uint32(1)
_PERM_B = _PERM_RNG.integers(0, 1 << 32, NUM_PERM, dtype=np.uint32)
_SIG_SEED = 20240601
# datasketch >= 2 labels hash values with the scheme that made them; ours are 32-bit like its default's.
_LEAN_SCHEME = {"scheme": scheme} if (scheme := getattr(MinHash(num_perm=1), "scheme", None)) else {}
_CHUNK_CHARS = 1 << 21  # characters hashed per numpy pass


def _shingle_text(example: Example) -> str:
    return _fold(f"{example.prompt} {example.answer}").ljust(SHINGLE, "\0")  # a short text is one shingle


def _prompt_shingle_text(example: Example) -> str:
    return example.prompt_key().ljust(SHINGLE, "\0")


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)


def _hash_windows(codes: np.ndarray) -> np.ndarray:
    """A 32-bit hash of every window of SHINGLE code points (polynomial, then the splitmix64 finaliser)."""
    n = len(codes) - SHINGLE + 1
    h = codes[:n].copy()
    for k in range(1, SHINGLE):
        h *= _POLY
        h += codes[k : k + n]
    h ^= h >> _S30
    h *= _MIX1
    h ^= h >> _S27
    h *= _MIX2
    h ^= h >> _S31
    return (h >> _S32).astype(np.uint32)


def shingles(text: str) -> np.ndarray:
    """The distinct hashes of the text's character 5-grams (the whole text when shorter)."""
    return np.unique(_hash_windows(_codes(text.ljust(SHINGLE, "\0"))))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two `shingles` sets."""
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def signatures(texts: Sequence[str]) -> np.ndarray:
    """MinHash signatures (NUM_PERM uint32 per text) of each text's character 5-grams.

    Vectorised over many texts at once: a chunk's texts are concatenated, every window hashed, the
    windows that straddle two texts dropped, and each permutation's minimum taken per text.
    """
    out = np.empty((len(texts), NUM_PERM), dtype=np.uint32)
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and (chars == 0 or chars + len(texts[end]) <= _CHUNK_CHARS):
            chars += len(texts[end])
            end += 1
        chunk = [t.ljust(SHINGLE, "\0") for t in texts[start:end]]
        lengths = np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk))
        hashes = _hash_windows(_codes("".join(chunk)))
        owner = np.repeat(np.arange(len(chunk)), lengths)
        hashes = hashes[owner[: len(hashes)] == owner[SHINGLE - 1 :]]
        counts = lengths - (SHINGLE - 1)
        offsets = np.cumsum(counts) - counts
        for k in range(NUM_PERM):
            permuted = hashes * _PERM_A[k]
            permuted += _PERM_B[k]
            out[start:end, k] = np.minimum.reduceat(permuted, offsets)
        start = end
    return out


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise DataError(f"near-duplicate threshold must be in (0, 1], not {threshold}")


class _NearIndex:
    """Texts seen so far: MinHashLSH finds candidates (banded a little below the threshold, so that few
    near duplicates are missed) and the exact Jaccard of the candidates' shingles decides."""

    def __init__(self, threshold: float) -> None:
        _check_threshold(threshold)
        self.threshold = threshold
        band_at = min(max(threshold - 0.05, 0.05), 0.95)
        self.lsh = MinHashLSH(threshold=band_at, num_perm=NUM_PERM, weights=(0.05, 0.95))
        self.texts: list[str] = []

    def near(self, text: str, sketch: LeanMinHash) -> bool:
        candidates = self.lsh.query(sketch)
        if not candidates:
            return False
        mine = shingles(text)
        return any(jaccard(mine, shingles(self.texts[j])) >= self.threshold for j in candidates)

    def matches(self, text: str, sketch: LeanMinHash) -> list[int]:
        """Positions (in `add` order) of the texts seen so far that `text` is a near duplicate of."""
        candidates = self.lsh.query(sketch)
        if not candidates:
            return []
        mine = shingles(text)
        return [j for j in candidates if jaccard(mine, shingles(self.texts[j])) >= self.threshold]

    def add(self, text: str, sketch: LeanMinHash) -> None:
        self.lsh.insert(len(self.texts), sketch, check_duplication=False)
        self.texts.append(text)


def _sketches(texts: Sequence[str]) -> list[LeanMinHash]:
    return [LeanMinHash(seed=_SIG_SEED, hashvalues=s, **_LEAN_SCHEME) for s in signatures(texts)]


def dedupe(examples: Sequence[Example], threshold: float | None = DEFAULT_NEAR_DUP_THRESHOLD,
           ) -> tuple[list[Example], int, int]:
    """(kept, exact duplicates removed, near duplicates kept); the first occurrence of a copy is kept.

    Exact copies (equal `key()`) are removed. Near duplicates (Jaccard similarity of the character 5-grams of
    the folded prompt + answer >= `threshold` with an earlier row; None: not looked for) are only counted: they
    are paraphrases (a greeting more, a word changed) that a small dataset needs, and the split keeps each
    with the rows it resembles (`prompt_groups`), so none is learned and tested on.
    """
    seen: set[str] = set()
    unique: list[Example] = []
    for example in examples:
        key = example.key()
        if key not in seen:
            seen.add(key)
            unique.append(example)
    exact = len(examples) - len(unique)
    if threshold is None:
        return unique, exact, 0
    index = _NearIndex(threshold)
    texts = [_shingle_text(e) for e in unique]
    near = 0
    for text, sketch in zip(texts, _sketches(texts), strict=True):
        if index.near(text, sketch):
            near += 1
        else:
            index.add(text, sketch)
    return unique, exact, near


def drop_overlap(train: Sequence[Example], heldout: Sequence[Example], *,
                 near_dup_threshold: float | None = None) -> tuple[list[Example], int]:
    """(held-out rows whose prompt `train` does not hold, how many were dropped): an equal prompt key
    (whatever the answers), and with a threshold also a prompt that near-duplicates a train prompt."""
    keys = {e.prompt_key() for e in train}
    kept = [e for e in heldout if e.prompt_key() not in keys]
    if near_dup_threshold is not None and kept and train:
        index = _NearIndex(near_dup_threshold)
        train_texts = [_prompt_shingle_text(e) for e in {e.prompt_key(): e for e in train}.values()]
        for text, sketch in zip(train_texts, _sketches(train_texts), strict=True):
            index.add(text, sketch)
        texts = [_prompt_shingle_text(e) for e in kept]
        kept = [e for e, text, sketch in zip(kept, texts, _sketches(texts), strict=True)
                if not index.near(text, sketch)]
    return kept, len(heldout) - len(kept)


def prompt_groups(examples: Sequence[Example], near_dup_threshold: float | None = DEFAULT_NEAR_DUP_THRESHOLD,
                  ) -> list[list[Example]]:
    """The rows grouped by prompt, groups in order of their first row: equal prompt keys, and with a
    threshold prompts that are near duplicates of one another (transitively). A split keeps each group
    whole, so no prompt is both learned and tested on."""
    by_key: dict[str, list[Example]] = {}
    for example in examples:
        by_key.setdefault(example.prompt_key(), []).append(example)
    groups = list(by_key.values())
    if near_dup_threshold is None or len(groups) < 2:
        return groups
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index = _NearIndex(near_dup_threshold)
    texts = [_prompt_shingle_text(group[0]) for group in groups]
    for i, (text, sketch) in enumerate(zip(texts, _sketches(texts), strict=True)):
        for j in index.matches(text, sketch):
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)
        index.add(text, sketch)
    merged: dict[int, list[Example]] = {}
    for i, group in enumerate(groups):
        merged.setdefault(root(i), []).extend(group)
    return list(merged.values())


# ------------------------------------------------------------------------------------------- splitting


def _size(value: float | int, total: int, name: str) -> int:
    """Rows for a split: a fraction in (0, 1), a count >= 1 (a whole float counts too), or 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{name} must be a number, not {value!r}")
    if value == 0:
        return 0
    if 0 < value < 1:
        return math.floor(total * value + 0.5)
    if value >= 1 and float(value).is_integer():
        return int(value)
    raise DataError(f"{name} must be a fraction in (0, 1) or a whole number of rows, not {value}")


def _allocate(sizes: list[int], target: int) -> list[int]:
    """`target` rows shared among groups in proportion to their sizes (largest remainder)."""
    total = sum(sizes)
    if not total or not target:
        return [0] * len(sizes)
    quotas = [size * target / total for size in sizes]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (shares[i] - quotas[i], i))
    for i in by_remainder[: target - sum(shares)]:
        shares[i] += 1
    return shares


def _stratified_counts(sizes: list[int], n_val: int, n_test: int) -> tuple[list[int], list[int]]:
    """(val, test) rows per label: proportional; every label keeps a train row; when there are enough
    rows, every label with >= 3 rows gets a val and a test row. Totals stay as asked where possible."""
    val, test = _allocate(sizes, n_val), _allocate(sizes, n_test)
    groups = range(len(sizes))

    def train(i: int) -> int:
        return sizes[i] - val[i] - test[i]

    for i in groups:
        while train(i) < 1 and val[i] + test[i] > 0:
            split = test if test[i] >= val[i] else val
            split[i] -= 1
            receiver = max((j for j in groups if train(j) > 1), key=train, default=None)
            if receiver is not None:
                split[receiver] += 1
    eligible = [i for i in groups if sizes[i] >= 3]
    for split, total in ((test, n_test), (val, n_val)):
        if total < len(eligible):
            continue
        for i in eligible:
            if split[i] == 0 and train(i) > 1:
                donor = max((j for j in groups if split[j] > 1), key=lambda j: split[j], default=None)
                if donor is None:
                    break
                split[donor] -= 1
                split[i] += 1
    return val, test


def _take(groups: Sequence[list[Example]], target: int, keep: int = 1,
          ) -> tuple[list[list[Example]], list[list[Example]]]:
    """(groups taken, groups left), in order: a group is taken while the rows taken are short of `target`
    and taking it overshoots no more than leaving it undershoots, and never when fewer than `keep` rows
    would be left."""
    taken: list[list[Example]] = []
    left: list[list[Example]] = []
    count, remaining = 0, sum(map(len, groups))
    for group in groups:
        size = len(group)
        if count < target and 2 * count + size <= 2 * target and remaining - size >= keep:
            taken.append(group)
            count += size
            remaining -= size
        else:
            left.append(group)
    return taken, left


def _rows(groups: Iterable[list[Example]]) -> list[Example]:
    return [row for group in groups for row in group]


def split_examples(
    examples: Sequence[Example],
    task: TaskSpec,
    *,
    val_size: float | int = 0.15,
    test_size: float | int = 0.15,
    seed: int = 0,
    balance: bool = False,
    near_dup_threshold: float | None = DEFAULT_NEAR_DUP_THRESHOLD,
) -> Splits:
    """Seeded train/val/test split, grouped by prompt (`prompt_groups`); stratified by answer for
    classification (a group counts under its most common answer).

    Sizes are fractions in (0, 1) or row counts (0 allowed); whole groups make them up as nearly as they
    can, and train always keeps a row (of each label, for classification). `balance` (classification)
    oversamples minority labels in train only, up to the majority count.
    """
    if balance and task.kind != "classification":
        raise DataError(f"--balance oversamples labels: task {task.name!r} is a generation task")
    total = len(examples)
    n_val, n_test = _size(val_size, total, "val_size"), _size(test_size, total, "test_size")
    if total and n_val + n_test >= total:
        raise DataError(f"val_size {val_size} + test_size {test_size} leave no training rows of {total}")
    rng = random.Random(seed)
    shuffled = list(examples)
    rng.shuffle(shuffled)
    groups = prompt_groups(shuffled, near_dup_threshold)
    train: list[Example] = []
    val: list[Example] = []
    test: list[Example] = []
    if task.kind == "classification":
        by_label = _groups_by_label(groups, task)
        sizes = [sum(map(len, label_groups)) for label_groups in by_label.values()]
        val_counts, test_counts = _stratified_counts(sizes, n_val, n_test)
        for label_groups, v, t in zip(by_label.values(), val_counts, test_counts, strict=True):
            taken, left = _take(label_groups, t)
            test += _rows(taken)
            taken, left = _take(left, v)
            val += _rows(taken)
            train += _rows(left)
        for split in (train, val, test):
            rng.shuffle(split)
    else:
        taken, left = _take(groups, n_test)
        test = _rows(taken)
        taken, left = _take(left, n_val)
        val, train = _rows(taken), _rows(left)
    oversampled = 0
    if balance:
        rows_by_label = _by_label(train, task)
        majority = max(map(len, rows_by_label.values()), default=0)
        extra = [row for rows in rows_by_label.values() for row in rng.choices(rows, k=majority - len(rows))]
        oversampled = len(extra)
        train += extra
        rng.shuffle(train)
    return Splits(train=train, val=val, test=test, oversampled=oversampled)


def _label_order(task: TaskSpec) -> Callable[[str], tuple[int, str]]:
    order = {label: i for i, label in enumerate(task.labels)}
    return lambda label: (order.get(label, len(order)), label)


def _by_label(examples: Iterable[Example], task: TaskSpec) -> dict[str, list[Example]]:
    """Rows grouped by answer, in the task's label order (other answers after, sorted)."""
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.answer, []).append(example)
    key = _label_order(task)
    return dict(sorted(groups.items(), key=lambda kv: key(kv[0])))


def _groups_by_label(groups: Iterable[list[Example]], task: TaskSpec) -> dict[str, list[list[Example]]]:
    """Prompt groups by their most common answer (ties: the first), in the task's label order."""
    by_label: dict[str, list[list[Example]]] = {}
    for group in groups:
        label = Counter(e.answer for e in group).most_common(1)[0][0]
        by_label.setdefault(label, []).append(group)
    key = _label_order(task)
    return dict(sorted(by_label.items(), key=lambda kv: key(kv[0])))


def _imbalance_warning(distribution: dict[str, int], balance: bool) -> str | None:
    missing = [label for label, n in distribution.items() if n == 0]
    present = {label: n for label, n in distribution.items() if n}
    warnings = []
    if missing:
        warnings.append(f"no rows for label(s) {', '.join(missing)}: the model cannot learn them")
    if present:
        most, least = max(present, key=present.__getitem__), min(present, key=present.__getitem__)
        ratio = present[most] / present[least]
        if ratio >= 5:
            advice = "minority labels are oversampled in train (--balance)" if balance else \
                "consider --balance to oversample minority labels in train"
            warnings.append(f"labels are imbalanced: {most!r} has {present[most]} rows, {least!r} only "
                            f"{present[least]} ({ratio:.1f}x); {advice}")
    return "; ".join(warnings) or None


# ----------------------------------------------------------------------------------------------- entry


def prepare_dataset(
    path: str | os.PathLike[str],
    task: TaskSpec,
    *,
    columns: dict[str, str] | None = None,
    strict: bool = False,
    count_tokens: Callable[[Example], int] | None = None,
    near_dup_threshold: float | None = DEFAULT_NEAR_DUP_THRESHOLD,
    val_size: float | int = 0.15,
    test_size: float | int = 0.15,
    seed: int = 0,
    balance: bool = False,
    eval_file: str | os.PathLike[str] | None = None,
) -> tuple[Splits, DataReport]:
    """The user's file read, validated, cleaned, deduplicated and split, with the report.

    With `eval_file` the test split is that file (cleaned the same way, rows whose prompt train or val
    holds dropped) and `path` is split into train/val only. Raises DataError for unusable input.
    """
    examples, report = load_examples(path, task, columns=columns, strict=strict, count_tokens=count_tokens)
    kept, report.duplicates_removed, report.near_duplicates_kept = dedupe(examples, near_dup_threshold)
    report.rows_kept = len(kept)
    if task.kind == "classification":
        counts = Counter(e.answer for e in kept)
        report.label_distribution = {label: counts.get(label, 0) for label in task.labels}
        report.imbalance_warning = _imbalance_warning(report.label_distribution, balance)
    if eval_file is None:
        splits = split_examples(kept, task, val_size=val_size, test_size=test_size, seed=seed, balance=balance,
                                near_dup_threshold=near_dup_threshold)
    else:
        heldout, heldout_report = load_examples(eval_file, task, columns=columns, strict=strict,
                                                count_tokens=count_tokens)
        heldout, heldout_report.duplicates_removed, heldout_report.near_duplicates_kept = dedupe(
            heldout, near_dup_threshold)
        heldout_report.rows_kept = len(heldout)
        splits = split_examples(kept, task, val_size=val_size, test_size=0, seed=seed, balance=balance,
                                near_dup_threshold=near_dup_threshold)
        test, removed = drop_overlap([*splits.train, *splits.val], heldout, near_dup_threshold=near_dup_threshold)
        if not test:
            raise DataError(f"every prompt of {eval_file} also occurs in the training or validation rows of "
                            f"{path}: nothing is left to test on")
        heldout_report.leaked_removed = removed
        report.heldout = heldout_report
        splits = splits.model_copy(update={"test": test, "leaked_removed": splits.leaked_removed + removed})
    report.leaked_removed = splits.leaked_removed
    report.oversampled = splits.oversampled
    report.splits = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    log.info("event=user_data_prepared task=%s file=%s rows_read=%d rows_kept=%d invalid=%d train=%d val=%d test=%d",
             task.name, report.file, report.rows_read, report.rows_kept,
             sum(r.count for r in report.invalid.values()), *report.splits.values())
    return splits, report


# ----------------------------------------------------------------------------------------- JSONL files


def write_jsonl(path: str | os.PathLike[str], examples: Iterable[Example]) -> None:
    """Write the examples one JSON object per line, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for example in examples:
                f.write(example.model_dump_json() + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Examples written by `write_jsonl`; DataError names the first line that is not one."""
    path = Path(path)
    examples = []
    for number, raw in enumerate(_read_bytes(path).decode("utf-8", "replace").split("\n"), 1):
        if raw.strip():
            try:
                examples.append(Example.model_validate_json(raw))
            except ValueError as exc:
                raise DataError(f"{path} line {number}: not an example ({exc.__class__.__name__})") from None
    return examples
