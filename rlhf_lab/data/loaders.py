"""Loaders: files (or hub datasets) to the plain Python rows the token datasets take.

Every row loader returns `Rows`, a list of plain dicts (or strings, for `load_text` and
`load_prompts`) with a `report` attribute, a `LoadReport` that counts what was read, returned and
skipped. The rows feed `rlhf_lab.data.datasets`:

- SFT: `{"prompt", "completion"}` (`load_prompt_completion`, `load_dolly`, `load_alpaca`,
  `load_gsm8k`, which adds `"gold"`) -> `SFTDataset`
- preferences: `{"prompt", "chosen", "rejected"}` (`load_preference_rows`, `load_hh`,
  `load_gsm8k_solution_pairs`) -> `PreferenceDataset`
- unpaired feedback: `{"prompt", "completion", "label"}`, label true = desirable, false =
  undesirable (`load_unpaired_rows`; `unpair` splits preference pairs into such rows) ->
  `UnpairedDataset` (KTO)
- pretraining: strings (`load_text`) -> `PackedTextDataset`
- RL: strings (`load_prompts`)

Text convention: `prompt + completion` is exactly the text the model should see, so a completion
carries its own separating whitespace and never an EOS (the datasets append EOS themselves).
Prompts made with the "qa" template end with "A:" and their completions start with a space
(GSM8K, as in the built-in tasks); prompts made with the "instruction" template end with
"### Response:\\n" and their completions are the response as is (Dolly, Alpaca); HH-RLHF prompts
end with "\\n\\nAssistant:" and their answers keep the leading space of the transcript.

Sources (`path`): `.jsonl`, `.jsonl.gz`, `.json` or `.json.gz` (one JSON list of objects) files;
or, when `path` does not exist and looks like a hub dataset id ("openai/gsm8k"), the
`datasets.load_dataset(path, config, split=split)` rows. With `HF_DATASETS_OFFLINE`,
`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set, a hub id fails at once with FileNotFoundError.

Bad rows (invalid JSON, a non-object row, a missing field, a field of the wrong type, an empty
completion/chosen/rejected, a row a loader cannot split) raise `DataError` (a `rlhf_lab.errors.UserError`,
so a ValueError) naming the file, the 1-based line (item of a `.json` list, row of a hub dataset) and
the field. With
`on_error="skip"` such rows are skipped, counted in `report.n_skipped` / `report.skipped_lines`,
and a warning with the count and the first line numbers is logged; never silently.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from rlhf_lab.data.templates import format_prompt
from rlhf_lab.errors import DataError

__all__ = [
    "DataError",
    "GSM8KJudge",
    "LoadReport",
    "Rows",
    "extract_gsm8k_answer",
    "gsm8k_reward",
    "load_alpaca",
    "load_dolly",
    "load_gsm8k",
    "load_gsm8k_solution_pairs",
    "load_hh",
    "load_jsonl_rows",
    "load_preference_rows",
    "load_prompt_completion",
    "load_prompts",
    "load_text",
    "load_unpaired_rows",
    "normalize_number",
    "train_val_split",
    "unpair",
]

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
EOS_TEXT = "<|endoftext|>"

_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SHOWN_LINES = 5  # line numbers named in the skip warning


class _FieldError(Exception):
    """Raised by a row converter; `_load` turns it into a DataError with the file and line."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field, self.problem = field, problem


@dataclass
class LoadReport:
    """What a loader read from `source`.

    `n_records`: records read (JSON lines, list items, hub rows, text units); `n_rows`: rows
    returned (a GSM8K solutions record gives zero or more pairs); `n_skipped`: bad records skipped
    under `on_error="skip"`, at `skipped_lines` (1-based), the first messages in `errors`.
    """

    source: str
    n_records: int = 0
    n_rows: int = 0
    n_skipped: int = 0
    skipped_lines: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.source}: {self.n_rows} rows from {self.n_records} records, "
                f"{self.n_skipped} skipped")


class Rows(list):
    """A list of rows with the `LoadReport` of the load that made it (`rows.report`)."""

    def __init__(self, rows: Iterable = (), report: LoadReport | None = None):
        super().__init__(rows)
        self.report = report if report is not None else LoadReport(source="<memory>")


# --------------------------------------------------------------------------- reading records


def _offline() -> bool:
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(n, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for n in names)


def _looks_like_hub_id(path: str) -> bool:
    return (bool(_HUB_ID_RE.fullmatch(path)) and not path.endswith(_JSON_SUFFIXES)
            and not path.endswith((".txt", ".gz")))


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _records(path: str | os.PathLike, split: str, config: str | None
             ) -> tuple[str, str, Iterator[tuple[int, Any]]]:
    """(source name, unit word, iterator of (1-based number, record or _FieldError))."""
    p = Path(path)
    name = str(path)
    if p.is_file():
        if name.endswith((".jsonl", ".jsonl.gz")):
            return name, "line", _jsonl_records(p)
        if name.endswith((".json", ".json.gz")):
            return name, "item", _json_list_records(p)
        raise DataError(name, problem=f"unsupported file type; use one of {', '.join(_JSON_SUFFIXES)}")
    if p.exists():
        raise DataError(name, problem=f"not a file; pass a {'/'.join(_JSON_SUFFIXES)} file")
    if not _looks_like_hub_id(name):
        raise FileNotFoundError(f"{name}: no such file")
    return name, "row", _hub_records(name, split, config)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, _FieldError(None, f"invalid JSON ({e.msg} at column {e.colno})")


def _json_list_records(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(str(path), e.lineno, None, f"invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(str(path), None, None,
                        f"a .json file must hold a list of objects, got {type(data).__name__}")
    yield from enumerate(data, 1)


def _hub_records(name: str, split: str, config: str | None) -> Iterator[tuple[int, Any]]:
    if _offline():
        raise FileNotFoundError(
            f"{name!r} is not a local file; it looks like a hub dataset id, but hub access is "
            "off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set). Pass a "
            "local .jsonl/.jsonl.gz/.json file, or unset the offline flag on a machine with a "
            "network"
        )
    import datasets  # heavy; only for hub ids

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing dataset, missing config: one clear message
        raise FileNotFoundError(
            f"{name!r} is not a local file and could not be loaded as hub dataset "
            f"(config={config!r}, split={split!r}): {type(e).__name__}: {e}"
        ) from e
    yield from enumerate(ds, 1)


def _load(
    path: str | os.PathLike,
    convert: Callable[[dict], list],
    on_error: OnError,
    split: str = "train",
    config: str | None = None,
) -> Rows:
    """Read records, convert each (a dict) into zero or more rows; handle bad records."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    source, unit, records = _records(path, split, config)
    report = LoadReport(source=source)
    rows: list = []
    for number, record in records:
        report.n_records += 1
        try:
            if isinstance(record, _FieldError):
                raise record
            if not isinstance(record, dict):
                raise _FieldError(None, f"expected a JSON object, got {type(record).__name__}")
            rows.extend(convert(record))
        except _FieldError as e:
            error = DataError(source, number, e.field, e.problem, unit)
            if on_error == "raise":
                raise error from None
            report.n_skipped += 1
            report.skipped_lines.append(number)
            if len(report.errors) < _SHOWN_LINES:
                report.errors.append(str(error))
    report.n_rows = len(rows)
    if report.n_skipped:
        shown = ", ".join(map(str, report.skipped_lines[:_SHOWN_LINES]))
        more = ", ..." if report.n_skipped > _SHOWN_LINES else ""
        log.warning("%s: skipped %d bad of %d records (%ss %s%s); first: %s", source,
                    report.n_skipped, report.n_records, unit, shown, more, report.errors[0])
    return Rows(rows, report)


# --------------------------------------------------------------------------- field checks


def _get(record: dict, name: str, *, nonempty: bool = False, optional: bool = False,
         label: str | None = None) -> str:
    """`record[name]` as a string; `_FieldError` if missing, not a string, or (nonempty) blank."""
    label = label or name
    if name not in record or record[name] is None:
        if optional:
            return ""
        raise _FieldError(label, "missing")
    value = record[name]
    if not isinstance(value, str):
        raise _FieldError(label, f"must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise _FieldError(label, "is empty")
    return value


# --------------------------------------------------------------------------- text


def load_text(
    path: str | os.PathLike,
    val_fraction: float = 0.0,
    unit: Literal["paragraph", "line", "file"] = "paragraph",
    *,
    on_error: OnError = "raise",
) -> Rows | tuple[Rows, Rows]:
    """A plain UTF-8 text corpus (`.txt`, or `.gz`) as a list of non-empty documents (strings).

    `unit`: "paragraph" (default) splits at blank lines and keeps each block's inner newlines (for
    tinyshakespeare, one speech per document; `PackedTextDataset` puts EOS between documents);
    "line" gives each non-blank line (without its newline); "file" the whole text as one document.
    A line that is not valid UTF-8 is a bad row (DataError naming the file and line; skipped and
    counted with `on_error="skip"`). Blank lines are separators, not bad rows.

    With `val_fraction` > 0, returns `(train, val)`: the LAST `val_fraction` of the documents
    (at least one) is val, kept contiguous so that no passage is split between both; else returns
    one `Rows`. Use `train_val_split` for a shuffled split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if unit not in ("paragraph", "line", "file"):
        raise ValueError(f"unit must be 'paragraph', 'line' or 'file', got {unit!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        raw_lines = f.read().split(b"\n")
    report = LoadReport(source=str(p))
    lines = []
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            error = DataError(str(p), lineno, None, f"not valid UTF-8 (byte {e.start + 1})")
            if on_error == "raise":
                raise error from None
            report.n_skipped += 1
            report.skipped_lines.append(lineno)
            if len(report.errors) < _SHOWN_LINES:
                report.errors.append(str(error))
    text = "\n".join(lines)
    if unit == "paragraph":
        docs = [d.strip("\n") for d in re.split(r"\n[ \t\r]*\n", text)]
    elif unit == "line":
        docs = text.splitlines()
    else:
        docs = [text]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(str(p), None, None, "no non-empty text")
    report.n_records = report.n_rows = len(docs)
    if report.n_skipped:
        shown = ", ".join(map(str, report.skipped_lines[:_SHOWN_LINES]))
        more = ", ..." if report.n_skipped > _SHOWN_LINES else ""
        log.warning("%s: skipped %d bad lines (lines %s%s); first: %s", p, report.n_skipped,
                    shown, more, report.errors[0])
    if val_fraction == 0.0:
        return Rows(docs, report)
    if len(docs) < 2:
        raise ValueError(f"{p}: one document cannot be split into train and val")
    return tail_split(Rows(docs, report), val_fraction)


# --------------------------------------------------------------------------- generic rows


def load_jsonl_rows(
    path: str | os.PathLike,
    fields: Sequence[str] = (),
    *,
    on_error: OnError = "raise",
    split: str = "train",
    config: str | None = None,
) -> Rows:
    """Every record of a `.jsonl`/`.jsonl.gz`/`.json` file (or hub dataset) as a dict, unchanged.

    Bad rows: invalid JSON, a record that is not an object, and a record where one of `fields`
    (the string fields the caller needs; none by default) is missing or not a string.
    """
    def convert(r: dict) -> list[dict]:
        for name in fields:
            _get(r, name)
        return [dict(r)]

    return _load(path, convert, on_error, split, config)


def load_prompt_completion(
    path: str | os.PathLike,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    *,
    on_error: OnError = "raise",
    split: str = "train",
    config: str | None = None,
) -> Rows:
    """`{"prompt", "completion"}` rows from the two named string fields, taken as they are.

    The completion must not be blank; the prompt may be empty (unconditional text).
    """
    def convert(r: dict) -> list[dict]:
        return [{"prompt": _get(r, prompt_field),
                 "completion": _get(r, completion_field, nonempty=True)}]

    return _load(path, convert, on_error, split, config)


def load_preference_rows(
    path: str | os.PathLike,
    *,
    on_error: OnError = "raise",
    split: str = "train",
    config: str | None = None,
) -> Rows:
    """`{"prompt", "chosen", "rejected"}` rows, taken as they are (chosen/rejected not blank)."""
    def convert(r: dict) -> list[dict]:
        return [{"prompt": _get(r, "prompt"),
                 "chosen": _get(r, "chosen", nonempty=True),
                 "rejected": _get(r, "rejected", nonempty=True)}]

    return _load(path, convert, on_error, split, config)


def _label(record: dict) -> bool:
    """`record["label"]` as a JSON boolean; `_FieldError` if missing or anything else (1, "yes")."""
    if record.get("label") is None:
        raise _FieldError("label", "missing (true = desirable, false = undesirable)")
    if not isinstance(record["label"], bool):
        raise _FieldError("label", f"must be a boolean, true (desirable) or false (undesirable), got "
                                   f"{type(record['label']).__name__} {record['label']!r}")
    return record["label"]


def load_unpaired_rows(
    path: str | os.PathLike,
    *,
    on_error: OnError = "raise",
    split: str = "train",
    config: str | None = None,
) -> Rows:
    """`{"prompt", "completion", "label"}` rows of unpaired feedback (KTO), taken as they are.

    label is a JSON boolean: true for a desirable completion, false for an undesirable one. The
    completion must not be blank; the prompt may be empty.
    """
    def convert(r: dict) -> list[dict]:
        return [{"prompt": _get(r, "prompt"), "completion": _get(r, "completion", nonempty=True),
                 "label": _label(r)}]

    return _load(path, convert, on_error, split, config)


def unpair(rows: Iterable[dict]) -> Rows:
    """Unpaired rows from rows that are pairs or unpaired already, in order: each
    `{"prompt", "chosen", "rejected"}` pair gives a desirable `{"prompt", "completion": chosen,
    "label": True}` row then an undesirable one with its rejected answer; each `{"prompt",
    "completion", "label"}` row is kept as it is. Other fields are dropped. A row that is neither
    raises ValueError naming its index. The report of `rows` (if any) is kept.
    """
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and "chosen" in row and "rejected" in row:
            out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
            out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
        elif isinstance(row, dict) and "completion" in row and "label" in row:
            out.append({"prompt": row["prompt"], "completion": row["completion"], "label": row["label"]})
        else:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"row {i} is neither a preference pair (prompt, chosen, rejected) nor an unpaired "
                             f"row (prompt, completion, label); got {keys}")
    return Rows(out, getattr(rows, "report", None))


def load_prompts(
    path: str | os.PathLike,
    field: str = "prompt",
    *,
    on_error: OnError = "raise",
    split: str = "train",
    config: str | None = None,
) -> Rows:
    """The non-blank string `field` of each record, as a list of prompt strings (for RL)."""
    return _load(path, lambda r: [_get(r, field, nonempty=True)], on_error, split, config)


# --------------------------------------------------------------------------- instruction data


def _instruction_rows(input_field: str, output_field: str, keep: tuple[str, ...] = ()):
    """A record converter for instruction data: the "instruction" template with `input_field` as
    its input, `output_field` as the completion, and the string fields in `keep` copied over."""
    def convert(r: dict) -> list[dict]:
        instruction = _get(r, "instruction", nonempty=True)
        context = _get(r, input_field, optional=True)
        row = {"prompt": format_prompt("instruction", instruction, input=context),
               "completion": _get(r, output_field, nonempty=True)}
        row.update({k: r[k] for k in keep if isinstance(r.get(k), str)})
        return [row]

    return convert


def load_dolly(
    path: str | os.PathLike,
    *,
    on_error: OnError = "raise",
    split: str = "train",
    config: str | None = None,
) -> Rows:
    """databricks-dolly-15k rows (`instruction`, `context`, `response`) as SFT rows.

    prompt = the "instruction" template with `context` as its input (no `### Input:` block when
    the context is empty or missing), so it ends with "### Response:\\n"; completion = the
    response as is; `category` is kept when present. Instruction and response must not be blank.
    """
    return _load(path, _instruction_rows("context", "response", keep=("category",)), on_error, split,
                 config)


def load_alpaca(
    path: str | os.PathLike,
    *,
    on_error: OnError = "raise",
    split: str = "train",
    config: str | None = None,
) -> Rows:
    """Alpaca rows (`instruction`, `input`, `output`) as SFT rows, the same way as `load_dolly`."""
    return _load(path, _instruction_rows("input", "output"), on_error, split, config)


# --------------------------------------------------------------------------- GSM8K

_GOLD_RE = re.compile(r"-?\d+(?:\.\d+)?")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """`text` without commas, spaces and a leading "$"/"+", if it is then a plain number."""
    s = re.sub(r"[,\s]", "", text).lstrip("$+")
    return s if _GOLD_RE.fullmatch(s) else None


def _gsm8k_question_prompt(question: str) -> str:
    return format_prompt("qa", question.strip())


def load_gsm8k(
    path: str | os.PathLike,
    *,
    on_error: OnError = "raise",
    split: str = "train",
    config: str | None = "main",
) -> Rows:
    """GSM8K rows (`question`, `answer`) as `{"prompt", "completion", "gold"}`.

    prompt = "Q: {question}\\nA:" (the "qa" template); completion = " " + the full answer, its
    worked steps (with the `<<...>>` calculator notes) and the final "#### N" line; gold = N,
    normalised by `normalize_number` ("1,000" -> "1000"). An answer without a "#### N" number is a
    bad row (field "answer"). The hub id is "openai/gsm8k" with config "main".
    """
    def convert(r: dict) -> list[dict]:
        question = _get(r, "question", nonempty=True)
        answer = _get(r, "answer", nonempty=True)
        if "####" not in answer:
            raise _FieldError("answer", "has no '#### <number>' final answer")
        gold = normalize_number(answer.rsplit("####", 1)[1])
        if gold is None:
            raise _FieldError("answer", "the text after '####' is not a number")
        return [{"prompt": _gsm8k_question_prompt(question),
                 "completion": " " + answer.strip(), "gold": gold}]

    return _load(path, convert, on_error, split, config)


def extract_gsm8k_answer(completion: str) -> str | None:
    """The number a completion answers with (normalised), or None.

    Text from an EOS marker or a following "\\nQ:" (a model running on into a new question) on is
    ignored. The number after the last "####" wins when there is one; else the last number.
    """
    text = completion.split(EOS_TEXT, 1)[0].split("\nQ:", 1)[0]
    if "####" in text:
        found = _NUMBER_RE.findall(text.rsplit("####", 1)[1])
        if found:
            return normalize_number(found[0])
    found = _NUMBER_RE.findall(text)
    return normalize_number(found[-1].rstrip(",")) if found else None


def _same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def gsm8k_reward(prompts: Sequence[str], completions: Sequence[str],
                 golds: Sequence[str]) -> list[float]:
    """1.0 where the completion's answer (`extract_gsm8k_answer`) equals the gold number, else 0.0.

    Numbers compare by value ("18.00" == "18"). `prompts` only fixes the batch size.
    """
    if not len(prompts) == len(completions) == len(golds):
        raise ValueError(f"got {len(prompts)} prompts, {len(completions)} completions and "
                         f"{len(golds)} golds")
    return [float(_same_number(extract_gsm8k_answer(c), normalize_number(str(g))))
            for c, g in zip(completions, golds, strict=True)]


class GSM8KJudge:
    """A verifiable reward for GSM8K: `judge(prompts, completions) -> list[float]` (1.0 / 0.0).

    Built from `load_gsm8k` rows (or any rows with "prompt" and "gold"); it looks each prompt's
    gold up, so it plugs in wherever a `(prompts, completions)` reward callable goes
    (e.g. `rlhf_lab.rewards.CallableSource`). An unknown prompt raises KeyError.
    """

    def __init__(self, rows: Iterable[dict]):
        self.golds = {row["prompt"]: row["gold"] for row in rows}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        golds = []
        for p in prompts:
            if p not in self.golds:
                raise KeyError(f"GSM8KJudge has no gold answer for prompt {p[:80]!r}")
            golds.append(self.golds[p])
        return gsm8k_reward(prompts, completions, golds)


def _final_answer_to_hashes(solution: str) -> str:
    """Rewrite a final "A: N" line (the solutions file's form) as "#### N" (the GSM8K form)."""
    head, sep, last = solution.strip().rpartition("\n")
    if last.startswith("A:"):
        return f"{head}{sep}#### {last[2:].strip()}"
    return solution.strip()


def load_gsm8k_solution_pairs(
    path: str | os.PathLike,
    *,
    pairs: Literal["first", "all"] = "first",
    use_ground_truth: bool = False,
    on_error: OnError = "raise",
) -> Rows:
    """Preference pairs from GSM8K's `example_model_solutions.jsonl`.

    Each record has `question`, `ground_truth` and, per model, `{"is_correct", "solution"}`
    objects. Correct solutions are chosen, incorrect ones of the same question rejected, as
    `{"prompt", "chosen", "rejected", "gold"}` with the `load_gsm8k` prompt/completion form (the
    final "A: N" line becomes "#### N"). `pairs="first"` gives one pair per question (the first
    correct and first incorrect solution, in file order of the models); "all" every correct x
    incorrect pair. `use_ground_truth` adds the ground truth as the last correct solution
    (so a question whose model solutions are all wrong still gives a pair). Questions without
    both a correct and an incorrect solution give no pair (counted in `report.n_records`, not
    skipped). gold = the ground truth's final number.
    """
    if pairs not in ("first", "all"):
        raise ValueError(f"pairs must be 'first' or 'all', got {pairs!r}")

    def convert(r: dict) -> list[dict]:
        question = _get(r, "question", nonempty=True)
        truth = _get(r, "ground_truth", nonempty=True)
        gold = extract_gsm8k_answer(_final_answer_to_hashes(truth))
        if gold is None:
            raise _FieldError("ground_truth", "has no final number")
        correct, wrong = [], []
        for key, value in r.items():
            if not isinstance(value, dict):
                continue
            ok = value.get("is_correct")
            if not isinstance(ok, bool):
                raise _FieldError(f"{key}.is_correct", "must be a boolean"
                                  if ok is not None else "missing")
            text = _get(value, "solution", nonempty=True, label=f"{key}.solution")
            (correct if ok else wrong).append(" " + _final_answer_to_hashes(text))
        if use_ground_truth:
            correct.append(" " + _final_answer_to_hashes(truth))
        if not correct or not wrong:
            return []
        chosen_rejected = ([(correct[0], wrong[0])] if pairs == "first"
                           else [(c, w) for c in correct for w in wrong])
        prompt = _gsm8k_question_prompt(question)
        return [{"prompt": prompt, "chosen": c, "rejected": w, "gold": gold}
                for c, w in chosen_rejected]

    return _load(path, convert, on_error)


# --------------------------------------------------------------------------- HH-RLHF


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two HH transcripts, or _FieldError."""
    ends = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        i = text.rfind(ASSISTANT)
        if i < 0:
            raise _FieldError(name, "has no '\\n\\nAssistant:' turn")
        ends.append(i + len(ASSISTANT))
    prompt = chosen[:ends[0]]
    if rejected[:ends[1]] != prompt:
        raise _FieldError(
            "rejected", "does not share the chosen dialogue up to the last '\\n\\nAssistant:' "
            "turn (different turns, or an answer with more than one Assistant turn)")
    answers = []
    for name, text, end in (("chosen", chosen, ends[0]), ("rejected", rejected, ends[1])):
        answer = text[end:]
        if HUMAN in answer:
            raise _FieldError(name, "has a Human turn after its last Assistant turn")
        if not answer.strip():
            raise _FieldError(name, "final Assistant answer is empty")
        answers.append(answer)
    return prompt, answers[0], answers[1]


def load_hh(
    path: str | os.PathLike,
    *,
    on_error: OnError = "raise",
    split: str = "train",
    config: str | None = None,
) -> Rows:
    """Anthropic HH-RLHF rows (`chosen`, `rejected`: whole "\\n\\nHuman: ...\\n\\nAssistant: ..."
    dialogues) split into `{"prompt", "chosen", "rejected"}`.

    prompt = the shared dialogue up to and including the last "\\n\\nAssistant:" marker; chosen
    and rejected = the two final answers (with their leading space), which contain no Human or
    Assistant marker. Bad rows: the transcripts differ before the last Assistant marker (this is
    also the case when one answer spans several Assistant turns), or an answer is blank. The real
    harmless-base test file has 9 such rows of 2,312: load it with `on_error="skip"`.
    """
    def convert(r: dict) -> list[dict]:
        prompt, chosen, rejected = _split_hh(_get(r, "chosen", nonempty=True),
                                             _get(r, "rejected", nonempty=True))
        return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]

    return _load(path, convert, on_error, split, config)


# --------------------------------------------------------------------------- splits


def tail_split(rows: Sequence, val_fraction: float) -> tuple[Rows, Rows]:
    """`(train, val)` with val the LAST round(n * val_fraction) rows (at least one, at most n - 1),
    kept in order: for text, so that no passage is split between both. Both keep the report."""
    report = getattr(rows, "report", None)
    n_val = min(max(1, round(len(rows) * val_fraction)), len(rows) - 1)
    return Rows(rows[:-n_val], report), Rows(rows[-n_val:], report)


def train_val_split(rows: Sequence, val_fraction: float, seed: int = 0) -> tuple[Rows, Rows]:
    """A seeded shuffled split into `(train, val)`, val holding round(n * val_fraction) rows
    (at least one when val_fraction > 0, and at most n - 1). Both keep the input's report.

    The same `rows`, fraction and seed always give the same split; order within each part follows
    the shuffled order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    report = getattr(rows, "report", None)
    n = len(rows)
    if val_fraction == 0.0 or n == 0:
        return Rows(rows, report), Rows([], report)
    if n < 2:
        raise ValueError("cannot split a single row into train and val")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [rows[i] for i in order if i not in val_idx]
    val = [rows[i] for i in order[:n_val]]
    return Rows(train, report), Rows(val, report)
