"""`DataConfig` + `load_data`: every format reachable from a config, splits, limits, stage checks."""

import json
import logging
from pathlib import Path

import pytest

from rlhf_lab.data import FORMATS, DataConfig, DataError, check_stage_data, load_data, prompts_of

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def shared(rel: str) -> str:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent")
    return str(path)


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_every_format_loads_through_a_config(tmp_path):
    pc = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    files = {
        "text": (tmp_path / "t.txt", None),
        "prompt_completion": (_jsonl(tmp_path / "pc.jsonl", pc), {"prompt": "p0", "completion": "c0"}),
        "dolly": (_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "context": "", "response": "hi"}]),
                  {"prompt": "### Instruction:\nSay hi\n\n### Response:\n", "completion": "hi"}),
        "alpaca": (_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}]),
                   {"prompt": "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n", "completion": "3"}),
        "gsm8k": (_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]),
                  {"prompt": "Q: 1+1?\nA:", "completion": " 1+1=2\n#### 2", "gold": "2"}),
        "preference": (_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]),
                       {"prompt": "q", "chosen": "a", "rejected": "b"}),
        "hh": (_jsonl(tmp_path / "h.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                             "rejected": "\n\nHuman: hi\n\nAssistant: go away"}]),
               {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}),
        "unpaired": (_jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a", "label": True}]),
                     {"prompt": "q", "completion": "a", "label": True}),
        "prompts": (_jsonl(tmp_path / "q.jsonl", [{"prompt": "Q: 1+1=\nA:"}]), "Q: 1+1=\nA:"),
    }
    files["text"][0].write_text("one doc\n\nanother doc\n")
    assert set(files) | {"gsm8k_pairs"} == set(FORMATS)  # gsm8k_pairs: real file below
    for fmt, (path, first) in files.items():
        train, val = load_data(DataConfig(format=fmt, path=str(path)))
        assert len(val) == 0
        if fmt == "text":
            assert list(train) == ["one doc", "another doc"]
        else:
            assert train[0] == first, fmt


def test_val_fraction_val_path_and_limit(tmp_path, caplog):
    pc = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    path = _jsonl(tmp_path / "pc.jsonl", pc)
    train, val = load_data(DataConfig(path=path, val_fraction=0.2, seed=1))
    assert (len(train), len(val)) == (8, 2)
    assert sorted(r["prompt"] for r in [*train, *val]) == sorted(r["prompt"] for r in pc)  # nothing lost
    assert load_data(DataConfig(path=path, val_fraction=0.2, seed=1))[1] == val  # seeded
    assert load_data(DataConfig(path=path, val_fraction=0.2, seed=2))[1] != val
    other = _jsonl(tmp_path / "val.jsonl", pc[:3])
    train, val = load_data(DataConfig(path=path, val_path=other))
    assert (len(train), len(val)) == (10, 3)
    with caplog.at_level(logging.WARNING, logger="rlhf_lab.data.spec"):
        train, _ = load_data(DataConfig(path=path, limit=4))
    assert [r["prompt"] for r in train] == ["p0", "p1", "p2", "p3"]
    assert "keeps the first 4 of 10 training rows (6 left out)" in caplog.text
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"doc {i}" for i in range(10)))
    train, val = load_data(DataConfig(format="text", path=str(text), val_fraction=0.3))
    assert list(val) == ["doc 7", "doc 8", "doc 9"]  # contiguous tail, as load_text


def test_bad_rows_raise_or_skip_through_the_config(tmp_path, caplog):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "{not json",
                                           {"prompt": "c", "completion": ""}])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2"):
        load_data(DataConfig(path=path))
    with caplog.at_level(logging.WARNING):
        train, _ = load_data(DataConfig(path=path, on_error="skip"))
    assert len(train) == 1 and train.report.n_skipped == 2
    assert "skipped 2" in caplog.text


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="format"):
        DataConfig(format="parquet", path="x")
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(format="text")
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(path="x", val_fraction=1.0)
    with pytest.raises(ValueError, match="not both"):
        DataConfig(path="x", val_fraction=0.1, val_path="y")
    with pytest.raises(ValueError, match="on_error"):
        DataConfig(path="x", on_error="ignore")
    with pytest.raises(ValueError, match="data.limit"):
        DataConfig(path="x", limit=0)


def test_stage_kinds():
    check_stage_data("sft", DataConfig(format="dolly", path="x"))
    check_stage_data("dpo", DataConfig(format="hh", path="x"))
    check_stage_data("online_rl", DataConfig(format="gsm8k", path="x"))  # its prompts
    check_stage_data("dpo", DataConfig(format="unpaired", path="x"))  # variant kto (FitConfig checks the variant)
    check_stage_data("online_rl", DataConfig(format="unpaired", path="x"))  # its prompts
    with pytest.raises(ValueError, match="data.format 'unpaired' gives unpaired rows.*reward_model: preference"):
        check_stage_data("reward_model", DataConfig(format="unpaired", path="x"))
    with pytest.raises(ValueError, match="data.format 'hh' gives preference rows.*sft: prompt_completion"):
        check_stage_data("sft", DataConfig(format="hh", path="x"))
    with pytest.raises(ValueError, match="stage 'pretrain'"):
        check_stage_data("pretrain", DataConfig(format="dolly", path="x"))
    assert prompts_of(["a", {"prompt": "b", "completion": "c"}]) == ["a", "b"]


def test_real_files_through_configs():
    gsm = shared("gsm8k/test.jsonl")
    train, val = load_data(DataConfig(format="gsm8k", path=gsm, val_fraction=0.1))
    assert (len(train), len(val)) == (1187, 132)
    hh = shared("hh-rlhf/harmless-base-test.jsonl.gz")
    train, _ = load_data(DataConfig(format="hh", path=hh, on_error="skip"))
    assert len(train) == 2303 and train.report.n_skipped == 9
    pairs, _ = load_data(DataConfig(format="gsm8k_pairs", path=shared("gsm8k/example_model_solutions.jsonl")))
    assert len(pairs) == 731
    dolly, _ = load_data(DataConfig(format="dolly", path=shared("dolly/dolly-sample.jsonl"), limit=100))
    assert len(dolly) == 100


def test_a_file_without_rows_fails_naming_it(tmp_path):
    from rlhf_lab.errors import UserError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n   \n\n")
    for path in (empty, blank):
        with pytest.raises(DataError) as info:
            load_data(DataConfig(format="prompt_completion", path=str(path)))
        assert str(info.value) == (f"{path}: has no rows (the file is empty or holds only blank lines); data.path "
                                   "needs at least one row")
        assert isinstance(info.value, UserError) and info.value.path == str(path) and info.value.line is None
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}, {"prompt": "q"}])  # no completion: every row is bad
    with pytest.raises(DataError, match=r"bad.jsonl: has no usable rows: all 2 records are bad and were skipped "
                       r"\(data.on_error: skip\); first: .*bad.jsonl, line 1: field 'completion': missing; "
                       r"data.path needs at least one row$"):
        load_data(DataConfig(format="prompt_completion", path=bad, on_error="skip"))
    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"empty.jsonl: has no rows .*; data.val_path needs at least one row$"):
        load_data(DataConfig(format="prompt_completion", path=good, val_path=str(empty)))
    text = tmp_path / "blank.txt"
    text.write_text("\n\n")
    with pytest.raises(DataError, match="blank.txt: no non-empty text"):
        load_data(DataConfig(format="text", path=str(text)))
