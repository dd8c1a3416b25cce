"""Loaders: real files in ../shared/data (skipped when absent) and malformed files for each loader.

HH-RLHF holds offensive content by design: its tests assert structure only and never show rows.
"""

import gzip
import json
import logging
from pathlib import Path

import pytest

from rlhf_lab.data.loaders import (
    DataError,
    GSM8KJudge,
    LoadReport,
    Rows,
    extract_gsm8k_answer,
    gsm8k_reward,
    load_alpaca,
    load_dolly,
    load_gsm8k,
    load_gsm8k_solution_pairs,
    load_hh,
    load_jsonl_rows,
    load_preference_rows,
    load_prompt_completion,
    load_prompts,
    load_text,
    load_unpaired_rows,
    normalize_number,
    train_val_split,
    unpair,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent")
    return path


# --------------------------------------------------------------------------- real files


def test_tinyshakespeare_paragraphs_lines_and_val_split():
    path = shared("tinyshakespeare/input.txt")
    docs = load_text(path)
    assert isinstance(docs, Rows) and len(docs) == 7222 and docs.report.n_skipped == 0
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert all(d.strip() and not d.startswith("\n") for d in docs)
    lines = load_text(path, unit="line")
    assert len(lines) == 32777 and lines[0] == "First Citizen:"
    train, val = load_text(path, val_fraction=0.1)
    assert (len(train), len(val)) == (6500, 722)
    assert list(train) + list(val) == list(docs)  # contiguous tail split, nothing lost
    assert len(load_text(path, unit="file")) == 1


def test_gsm8k_train_and_test_every_row_parses():
    for name, n, first_gold in (("train", 7473, "72"), ("test", 1319, "18")):
        rows = load_gsm8k(shared(f"gsm8k/{name}.jsonl"))  # raises on any bad row
        assert len(rows) == n and rows.report.n_records == n and rows.report.n_skipped == 0
        assert rows[0]["gold"] == first_gold
        for row in rows:
            assert row["prompt"].startswith("Q: ") and row["prompt"].endswith("\nA:")
            assert row["completion"].startswith(" ") and "\n#### " in row["completion"]
            assert normalize_number(row["gold"]) == row["gold"] and "," not in row["gold"]
        # the gold answers themselves earn the full verifiable reward
        judge = GSM8KJudge(rows)
        assert judge([r["prompt"] for r in rows], [r["completion"] for r in rows]) == [1.0] * n
    train = load_gsm8k(shared("gsm8k/train.jsonl"))
    assert train[0] == {
        "prompt": "Q: Natalia sold clips to 48 of her friends in April, and then she sold half as "
                  "many clips in May. How many clips did Natalia sell altogether in April and "
                  "May?\nA:",
        "completion": " Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
                      "<<48+24=72>>72 clips altogether in April and May.\n#### 72",
        "gold": "72",
    }
    test = load_gsm8k(shared("gsm8k/test.jsonl"))
    assert test[2]["gold"] == "70000"
    assert sum("," in r["completion"].rsplit("####", 1)[1] for r in train) == 79


def test_gsm8k_solution_pairs_real_file():
    path = shared("gsm8k/example_model_solutions.jsonl")
    first = load_gsm8k_solution_pairs(path)
    assert len(first) == 731 and first.report.n_records == 1319 and first.report.n_skipped == 0
    assert len(load_gsm8k_solution_pairs(path, pairs="all")) == 2429
    assert len(load_gsm8k_solution_pairs(path, use_ground_truth=True)) == 1163
    row = first[0]
    assert row["prompt"].startswith("Q: ") and row["prompt"].endswith("\nA:")
    assert row["chosen"].startswith(" ") and row["chosen"].endswith("\n#### " + row["gold"])
    prompts = [r["prompt"] for r in first]
    golds = [r["gold"] for r in first]
    # the file's is_correct flags agree with the verifiable reward on every pair
    assert gsm8k_reward(prompts, [r["chosen"] for r in first], golds) == [1.0] * len(first)
    assert gsm8k_reward(prompts, [r["rejected"] for r in first], golds) == [0.0] * len(first)
    assert all(r["chosen"] != r["rejected"] for r in first)


def test_dolly_real_file():
    rows = load_dolly(shared("dolly/dolly-sample.jsonl"))
    assert len(rows) == 185 and rows.report.n_skipped == 0
    with_input = [r for r in rows if "\n\n### Input:\n" in r["prompt"]]
    assert len(with_input) == 52
    assert rows[0]["prompt"].startswith(
        "### Instruction:\nWhen did Virgin Australia start operating?\n\n### Input:\nVirgin "
        "Australia, the trading name")
    assert rows[0]["prompt"].endswith("[4]\n\n### Response:\n")
    assert rows[0]["completion"] == ("Virgin Australia commenced services on 31 August 2000 as "
                                     "Virgin Blue, with two aircraft on a single route.")
    assert rows[0]["category"] == "closed_qa"
    assert rows[1]["prompt"] == ("### Instruction:\nWhich is a species of fish? Tope or Rope"
                                 "\n\n### Response:\n")
    # the generic loaders read the same file
    generic = load_jsonl_rows(shared("dolly/dolly-sample.jsonl"),
                              fields=("instruction", "response"))
    assert len(generic) == 185 and set(generic[0]) == {"instruction", "context", "response",
                                                       "category"}
    pc = load_prompt_completion(shared("dolly/dolly-sample.jsonl"), "instruction", "response")
    assert pc[1] == {"prompt": "Which is a species of fish? Tope or Rope", "completion": "Tope"}
    assert load_prompts(shared("dolly/dolly-sample.jsonl"), "instruction")[1] == pc[1]["prompt"]


def test_hh_real_file_structure_only():
    path = shared("hh-rlhf/harmless-base-test.jsonl.gz")
    with pytest.raises(DataError) as err:
        load_hh(path)  # the real file has bad rows; the first is line 87
    assert err.value.line == 87 and err.value.field == "chosen" and str(path) in str(err.value)
    rows = load_hh(path, on_error="skip")
    assert len(rows) == 2303 and rows.report.n_records == 2312
    assert rows.report.n_skipped == 9
    assert rows.report.skipped_lines == [87, 517, 926, 1104, 1255, 1689, 1951, 1953, 2037]
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"].startswith("\n\nHuman:")
        assert row["prompt"].endswith("\n\nAssistant:")
        for answer in (row["chosen"], row["rejected"]):
            assert answer.strip() and answer.startswith(" ")
            assert "\n\nHuman:" not in answer and "\n\nAssistant:" not in answer
    # prompt + answer gives back the transcripts of the good rows exactly
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for n, line in enumerate(f, 1)
               if n not in rows.report.skipped_lines]
    assert all(r["prompt"] + r["chosen"] == x["chosen"] and r["prompt"] + r["rejected"]
               == x["rejected"] for r, x in zip(rows, raw, strict=True))


# --------------------------------------------------------------------------- malformed files

GOOD_PC = {"prompt": "p", "completion": " c"}
GOOD_PREF = {"prompt": "p", "chosen": " a", "rejected": " b"}
GOOD_UNPAIRED = {"prompt": "p", "completion": " c", "label": False}
GOOD_DOLLY = {"instruction": "Say hi.", "context": "", "response": "hi", "category": "x"}
GOOD_ALPACA = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
GOOD_GSM = {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}
GOOD_HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello",
           "rejected": "\n\nHuman: hi\n\nAssistant: go"}
GOOD_SOL = {"question": "What is 2+3?", "ground_truth": "2+3=5\nA: 5",
            "m1": {"is_correct": True, "solution": "2+3=5\nA: 5"},
            "m2": {"is_correct": False, "solution": "2+3=6\nA: 6"}}


def _without(row, key):
    return {k: v for k, v in row.items() if k != key}


def _with(row, key, value):
    return {**row, key: value}


# loader, good record, {case: (bad record, field named in the error)}
CASES = {
    "jsonl_rows": (lambda p, **kw: load_jsonl_rows(p, fields=("prompt",), **kw), GOOD_PC, {
        "missing": (_without(GOOD_PC, "prompt"), "prompt"),
        "nonstring": (_with(GOOD_PC, "prompt", 7), "prompt"),
    }),
    "prompt_completion": (load_prompt_completion, GOOD_PC, {
        "missing": (_without(GOOD_PC, "prompt"), "prompt"),
        "nonstring": (_with(GOOD_PC, "completion", ["c"]), "completion"),
        "empty": (_with(GOOD_PC, "completion", ""), "completion"),
    }),
    "preference_rows": (load_preference_rows, GOOD_PREF, {
        "missing": (_without(GOOD_PREF, "rejected"), "rejected"),
        "nonstring": (_with(GOOD_PREF, "chosen", 1.5), "chosen"),
        "empty": (_with(GOOD_PREF, "rejected", "  "), "rejected"),
    }),
    "unpaired_rows": (load_unpaired_rows, GOOD_UNPAIRED, {
        "missing": (_without(GOOD_UNPAIRED, "label"), "label"),
        "nonbool": (_with(GOOD_UNPAIRED, "label", 1), "label"),
        "string_label": (_with(GOOD_UNPAIRED, "label", "true"), "label"),
        "nonstring": (_with(GOOD_UNPAIRED, "completion", ["c"]), "completion"),
        "empty": (_with(GOOD_UNPAIRED, "completion", " "), "completion"),
    }),
    "prompts": (load_prompts, GOOD_PC, {
        "missing": (_without(GOOD_PC, "prompt"), "prompt"),
        "nonstring": (_with(GOOD_PC, "prompt", {"x": 1}), "prompt"),
        "empty": (_with(GOOD_PC, "prompt", ""), "prompt"),
    }),
    "dolly": (load_dolly, GOOD_DOLLY, {
        "missing": (_without(GOOD_DOLLY, "instruction"), "instruction"),
        "nonstring": (_with(GOOD_DOLLY, "context", 3), "context"),
        "empty": (_with(GOOD_DOLLY, "response", ""), "response"),
    }),
    "alpaca": (load_alpaca, GOOD_ALPACA, {
        "missing": (_without(GOOD_ALPACA, "output"), "output"),
        "nonstring": (_with(GOOD_ALPACA, "instruction", None), "instruction"),
        "empty": (_with(GOOD_ALPACA, "output", "\n"), "output"),
    }),
    "gsm8k": (load_gsm8k, GOOD_GSM, {
        "missing": (_without(GOOD_GSM, "answer"), "answer"),
        "nonstring": (_with(GOOD_GSM, "question", 12), "question"),
        "empty": (_with(GOOD_GSM, "answer", ""), "answer"),
        "no_gold": (_with(GOOD_GSM, "answer", "it is 5"), "answer"),
        "bad_gold": (_with(GOOD_GSM, "answer", "x\n#### five"), "answer"),
    }),
    "hh": (load_hh, GOOD_HH, {
        "missing": (_without(GOOD_HH, "rejected"), "rejected"),
        "nonstring": (_with(GOOD_HH, "chosen", 0), "chosen"),
        "empty": (_with(GOOD_HH, "chosen", "\n\nHuman: hi\n\nAssistant: "), "chosen"),
        "no_shared_prefix": (_with(GOOD_HH, "rejected", "\n\nHuman: yo\n\nAssistant: go"),
                             "rejected"),
        "multi_turn_answer": (_with(GOOD_HH, "chosen", GOOD_HH["chosen"] + "\n\nAssistant: more"),
                              "rejected"),
        "human_after": (_with(GOOD_HH, "chosen", GOOD_HH["chosen"] + "\n\nHuman: ok"), "chosen"),
    }),
    "gsm8k_solution_pairs": (load_gsm8k_solution_pairs, GOOD_SOL, {
        "missing": (_without(GOOD_SOL, "question"), "question"),
        "nonstring": (_with(GOOD_SOL, "m1", {"is_correct": True, "solution": 5}), "m1.solution"),
        "empty": (_with(GOOD_SOL, "m2", {"is_correct": False, "solution": ""}), "m2.solution"),
        "bad_flag": (_with(GOOD_SOL, "m2", {"is_correct": "no", "solution": "x"}),
                     "m2.is_correct"),
    }),
}

PARAMS = [pytest.param(name, "invalid_json", id=f"{name}-invalid_json") for name in CASES] + [
    pytest.param(name, case, id=f"{name}-{case}") for name, (_, _, cases) in CASES.items()
    for case in cases
]


def _write_jsonl(path: Path, records: list, bad_line3) -> Path:
    lines = [json.dumps(r) for r in records]
    lines.insert(2, bad_line3 if isinstance(bad_line3, str) else json.dumps(bad_line3))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name,case", PARAMS)
def test_malformed_line_3_raises_or_is_skipped(tmp_path, caplog, name, case):
    loader, good, cases = CASES[name]
    bad, fld = ('{"prompt": "p", "completion": ', None) if case == "invalid_json" else cases[case]
    path = _write_jsonl(tmp_path / f"{name}.jsonl", [good] * 4, bad)

    with pytest.raises(DataError) as err:
        loader(path)
    message = str(err.value)
    assert str(path) in message and "line 3" in message
    assert err.value.line == 3 and err.value.field == fld
    if fld is None:
        assert "invalid JSON" in message
    else:
        assert repr(fld) in message

    with caplog.at_level(logging.WARNING, logger="rlhf_lab.data.loaders"):
        rows = loader(path, on_error="skip")
    assert len(rows) == 4 and rows.report.n_records == 5
    assert rows.report.n_skipped == 1 and rows.report.skipped_lines == [3]
    assert rows == loader(_write_jsonl(tmp_path / "good.jsonl", [good] * 4, good))[:4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 1 bad of 5" in warnings[0]
    assert "lines 3" in warnings[0] and str(path) in warnings[0]


def test_skip_warning_lists_first_lines_and_count(tmp_path, caplog):
    records = [GOOD_PC if i % 2 else _without(GOOD_PC, "completion") for i in range(1, 15)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="rlhf_lab.data.loaders"):
        rows = load_prompt_completion(path, on_error="skip")
    assert len(rows) == 7 and rows.report.n_skipped == 7
    assert rows.report.skipped_lines == [2, 4, 6, 8, 10, 12, 14]
    assert "skipped 7 bad of 14 records (lines 2, 4, 6, 8, 10, ...)" in caplog.text


def test_malformed_text_file(tmp_path, caplog):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"one\n\ntwo \xff bad\nthree\n")
    with pytest.raises(DataError) as err:
        load_text(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="rlhf_lab.data.loaders"):
        docs = load_text(path, unit="line", on_error="skip")
    assert docs == ["one", "three"] and docs.report.skipped_lines == [3]
    assert "skipped 1 bad lines (lines 3)" in caplog.text
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no non-empty text"):
        load_text(blank)
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- formats and sources


def test_gz_and_json_list_and_blank_lines(tmp_path):
    rows = [GOOD_PREF, _with(GOOD_PREF, "prompt", "q")]
    gz = tmp_path / "prefs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_preference_rows(gz) == rows
    js = tmp_path / "prefs.json"
    js.write_text(json.dumps(rows + [_without(GOOD_PREF, "chosen")]), encoding="utf-8")
    with pytest.raises(DataError, match=r"prefs\.json, item 3: field 'chosen': missing"):
        load_preference_rows(js)
    assert load_preference_rows(js, on_error="skip") == rows
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"prompt": "p"}', encoding="utf-8")
    with pytest.raises(DataError, match="list of objects"):
        load_jsonl_rows(not_list)
    other = tmp_path / "rows.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_jsonl_rows(other)
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl_rows(gz, on_error="ignore")


def test_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hub dataset id.*HF_DATASETS_OFFLINE"):
        load_gsm8k("openai/gsm8k", split="test")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_jsonl_rows(tmp_path / "missing.jsonl")


def test_alpaca_prompt_forms(tmp_path):
    path = _write_jsonl(tmp_path / "alpaca.jsonl",
                        [GOOD_ALPACA, _with(GOOD_ALPACA, "input", "")], GOOD_ALPACA)
    rows = load_alpaca(path)
    assert rows[0] == {"prompt": "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n",
                       "completion": "5"}
    assert rows[1]["prompt"] == "### Instruction:\nAdd.\n\n### Response:\n"


def test_gsm8k_answer_extraction_and_reward():
    assert normalize_number(" 1,000 ") == "1000" and normalize_number("$5") == "5"
    assert normalize_number("five") is None
    assert extract_gsm8k_answer(" so 3 + 4 = 7\n#### 7<|endoftext|>Q: 9") == "7"
    assert extract_gsm8k_answer(" 2 apples then 1,250 dollars.") == "1250"
    assert extract_gsm8k_answer(" 12 then 13\nQ: next 99\nA: 4") == "13"
    assert extract_gsm8k_answer(" no number") is None
    assert extract_gsm8k_answer(" it is -3.50") == "-3.50"
    golds = ["7", "1250", "3.5", "4"]
    completions = [" #### 7", " total 1,250", " -> 3.50", " I do not know"]
    assert gsm8k_reward(["q"] * 4, completions, golds) == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="golds"):
        gsm8k_reward(["q"], ["a", "b"], ["1"])
    judge = GSM8KJudge([{"prompt": "Q: x\nA:", "gold": "2"}])
    assert judge(["Q: x\nA:", "Q: x\nA:"], [" 2", " 3"]) == [1.0, 0.0]
    with pytest.raises(KeyError):
        judge(["Q: unknown\nA:"], [" 2"])


def test_solution_pairs_modes(tmp_path):
    record = {**GOOD_SOL, "m3": {"is_correct": True, "solution": "5\nA: 5"},
              "m4": {"is_correct": False, "solution": "7\nA: 7"}}
    all_wrong = {**GOOD_SOL, "m1": {"is_correct": False, "solution": "1\nA: 1"}}
    path = _write_jsonl(tmp_path / "sol.jsonl", [record, all_wrong], record)
    first = load_gsm8k_solution_pairs(path)
    assert len(first) == 2 and first.report.n_records == 3  # all_wrong gives no pair
    assert first[0] == {"prompt": "Q: What is 2+3?\nA:", "chosen": " 2+3=5\n#### 5",
                        "rejected": " 2+3=6\n#### 6", "gold": "5"}
    assert len(load_gsm8k_solution_pairs(path, pairs="all")) == 8
    with_truth = load_gsm8k_solution_pairs(path, use_ground_truth=True)
    assert len(with_truth) == 3 and with_truth[2]["chosen"] == " 2+3=5\n#### 5"


def test_train_val_split_is_seeded_and_complete():
    rows = Rows([{"i": i} for i in range(100)], LoadReport(source="x", n_rows=100))
    train, val = train_val_split(rows, 0.1, seed=3)
    assert (len(train), len(val)) == (90, 10)
    assert sorted(r["i"] for r in list(train) + list(val)) == list(range(100))
    assert train_val_split(rows, 0.1, seed=3) == (train, val)
    assert train_val_split(rows, 0.1, seed=4)[1] != val
    assert train.report is rows.report and val.report is rows.report
    assert train_val_split(rows, 0.0)[1] == [] and len(train_val_split(rows[:3], 0.01)[1]) == 1
    with pytest.raises(ValueError):
        train_val_split(rows, 1.0)


def test_unpaired_rows_and_unpair(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text('{"prompt": "Q: 1+1=\\nA:", "completion": " 2", "label": true, "id": 7}\n'
                    '{"prompt": "Q: 1+1=\\nA:", "completion": " 3", "label": false}\n'
                    '{"prompt": "Q: 2+2=\\nA:", "completion": " 4", "label": 1}\n')
    with pytest.raises(DataError, match=r"kto\.jsonl, line 3: field 'label': must be a boolean, true \(desirable\) "
                                        r"or false \(undesirable\), got int 1"):
        load_unpaired_rows(path)
    rows = load_unpaired_rows(path, on_error="skip")
    assert rows == [{"prompt": "Q: 1+1=\nA:", "completion": " 2", "label": True},
                    {"prompt": "Q: 1+1=\nA:", "completion": " 3", "label": False}]
    # Pairs split into a desirable then an undesirable row; unpaired rows stay as they are.
    pairs = [{"prompt": "p", "chosen": " a", "rejected": " b", "gold": "a"}, *rows]
    assert unpair(pairs) == [{"prompt": "p", "completion": " a", "label": True},
                             {"prompt": "p", "completion": " b", "label": False}, *rows]
    assert unpair(rows).report is rows.report
    with pytest.raises(ValueError, match="row 1 is neither a preference pair"):
        unpair([pairs[0], {"prompt": "p", "completion": " a"}])
