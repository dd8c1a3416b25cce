"""Model folders (`rlhf_lab.models.io`): metadata, base discovery of a LoRA folder, stale files."""

import json

import pytest
import torch

from rlhf_lab.models.backbones import build_tiny_model
from rlhf_lab.models.io import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    BASE_DIR,
    find_base,
    is_adapter_folder,
    read_meta,
    save_model,
    write_meta,
)


def tiny(tokenizer):
    torch.manual_seed(0)
    return build_tiny_model("gpt2-tiny", tokenizer, n_layer=1, n_embd=32, n_head=2)


def adapter_folder(path, peft_base=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": peft_base}))
    return path


def test_meta_round_trips_and_a_plain_folder_has_none(tmp_path):
    assert read_meta(str(tmp_path)) == {}
    write_meta(str(tmp_path), {"scalar_head": True, "stage": "sft"})
    assert read_meta(str(tmp_path)) == {"scalar_head": True, "stage": "sft"}


def test_find_base_prefers_the_metadata_then_base_dir_then_peft(tmp_path):
    folder = adapter_folder(tmp_path / "policy", peft_base=str(tmp_path / "peft_base"))
    named, inner, peft_base = tmp_path / "named", folder / BASE_DIR, tmp_path / "peft_base"
    for d in (named, inner, peft_base):
        d.mkdir()
    # The metadata's folder wins over a base/ an earlier save may have left.
    assert find_base(str(folder), {"base_model": str(named)}) == str(named)
    assert find_base(str(folder), {"base_model": BASE_DIR}) == str(inner)
    assert find_base(str(folder), {}) == str(inner)
    inner.rmdir()
    assert find_base(str(folder), {}) == str(peft_base)  # a folder peft itself wrote


def test_find_base_without_any_base_names_what_it_tried(tmp_path):
    folder = adapter_folder(tmp_path / "policy", peft_base="/nowhere/base")
    with pytest.raises(OSError, match="has no base model") as info:
        find_base(str(folder), {"base_model": "/gone"})
    assert "'/gone'" in str(info.value) and "'/nowhere/base'" in str(info.value)


def test_saving_a_plain_model_removes_stale_adapter_files(tokenizer, tmp_path):
    adapter_folder(tmp_path)
    (tmp_path / ADAPTER_FILE).write_bytes(b"old")
    assert is_adapter_folder(str(tmp_path))
    assert save_model(tiny(tokenizer), str(tmp_path)) == {}
    assert not is_adapter_folder(str(tmp_path)) and not (tmp_path / ADAPTER_FILE).exists()
    assert (tmp_path / "config.json").exists()
