import logging
import socket
import threading
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from rlhf_lab.models.tokenizer import (
    PAD_TOKEN,
    ensure_pad_token,
    hub_unreachable_reason,
    load_tokenizer,
    train_bpe_tokenizer,
)
from rlhf_lab.tasks import ArithmeticTask

# ../shared/data beside the checkout: real files for tests, absent on users' machines.
GPT2_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gpt2-tokenizer"
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask()


@pytest.fixture(scope="module")
def tok(task):
    return train_bpe_tokenizer(task.tokenizer_texts(), vocab_size=512)


def test_returns_fast_tokenizer_with_gpt2_style_specials(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == tok.pad_token == tok.bos_token == tok.unk_token == EOS
    assert tok.eos_token_id == tok.pad_token_id
    assert tok.model_max_length == 1024
    assert EOS not in tok.decode(tok.encode("ab"))  # encode adds no special tokens


def test_round_trips_every_prompt_and_answer(task, tok):
    for p, a in zip(task.eval_prompts(), task.eval_answers(), strict=True):
        for text in (p, a, p + a):
            assert tok.decode(tok.encode(text)) == text
        # SFT tokenises prompt and completion apart; the join must not change the tokens.
        assert tok.encode(p) + tok.encode(a) == tok.encode(p + a)


@pytest.mark.parametrize("text", ["héllo wörld\n\n\ttabs  ", "数学 🎉 ∑", "\r\n", " leading space"])
def test_round_trips_text_never_seen_in_training(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    assert len(tok.encode("123")) == 3
    assert all(len(tok.encode(str(d))) == 1 for d in range(10))
    tokens = tok.convert_ids_to_tokens(tok.encode("Q: 12+34=\nA: 46"))
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("123446")


def test_eos_is_one_token_and_decodes_back(tok):
    ids = tok.encode(" 5" + EOS)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == " 5"


def test_vocab_size_bounds_the_vocabulary(task):
    texts = task.tokenizer_texts()
    small = train_bpe_tokenizer(texts, vocab_size=280)
    assert len(small) == 280
    assert len(train_bpe_tokenizer(texts, vocab_size=512)) > 280


def test_min_frequency_limits_merges():
    texts = ["abc"] * 3 + ["xyz"]
    assert "xy" in train_bpe_tokenizer(texts, min_frequency=1).get_vocab()
    assert "xy" not in train_bpe_tokenizer(texts, min_frequency=2).get_vocab()


def test_extra_special_tokens_are_kept_whole_and_first_is_eos():
    tok = train_bpe_tokenizer(["a b c"], special_tokens=["<|end|>", "<|sep|>"])
    assert tok.eos_token == tok.pad_token == "<|end|>"
    assert len(tok.encode("<|sep|>")) == 1


def test_model_max_length_is_stored():
    assert train_bpe_tokenizer(["a b"], model_max_length=64).model_max_length == 64


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="vocab_size=256 is below 257"):
        train_bpe_tokenizer(["a"], vocab_size=256)
    with pytest.raises(ValueError, match="special_tokens"):
        train_bpe_tokenizer(["a"], special_tokens=())


def test_save_load_round_trip(tok, task, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.eos_token == loaded.pad_token == EOS
    for text in task.eval_prompts()[:20] + task.pretrain_corpus(n_lines=20) + ["数学 🎉"]:
        assert loaded.encode(text) == tok.encode(text)


@pytest.mark.skipif(not GPT2_DIR.is_dir(), reason="../shared/data/gpt2-tokenizer not present")
def test_loads_local_gpt2_and_sets_pad_to_eos():
    tok = load_tokenizer(str(GPT2_DIR))
    assert tok.eos_token == EOS and tok.eos_token_id == 50256
    assert tok.pad_token == tok.eos_token  # GPT-2 ships without a pad token
    assert tok.encode("Hello world") == [15496, 995]


def test_offline_unknown_name_fails_fast_with_clear_message(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not found locally.*hub could not be reached"):
        load_tokenizer("rlhf-lab-test/no-such-tokenizer")
    assert no_network == []


def test_local_files_only_unknown_name_fails_without_network(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(OSError, match="local_files_only=True"):
        load_tokenizer("rlhf-lab-test/no-such-tokenizer", local_files_only=True)


def test_missing_local_path_fails_without_asking_the_hub(no_network, tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    assert no_network == []


# --------------------------------------------------------------------------- pad tokens, offline


def _bare_tokenizer(tok) -> PreTrainedTokenizerFast:
    """The same vocabulary with no special tokens declared (no pad, no eos)."""
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_ensure_pad_token_keeps_an_existing_pad(tok):
    assert ensure_pad_token(tok) is False
    assert tok.pad_token == EOS


def test_ensure_pad_token_uses_eos_when_there_is_no_pad(tok):
    bare = _bare_tokenizer(tok)
    bare.eos_token = EOS
    size = len(bare)
    assert ensure_pad_token(bare) is False
    assert bare.pad_token == EOS and bare.pad_token_id == bare.eos_token_id
    assert len(bare) == size


def test_ensure_pad_token_adds_a_pad_token_and_says_so(tok, caplog):
    bare = _bare_tokenizer(tok)
    assert bare.pad_token is None and bare.eos_token is None
    size = len(bare)
    with caplog.at_level(logging.WARNING, logger="rlhf_lab.models.tokenizer"):
        assert ensure_pad_token(bare) is True
    assert bare.pad_token == PAD_TOKEN == "<|pad|>"
    assert len(bare) == size + 1 and bare.pad_token_id == size
    assert "added '<|pad|>' as pad token" in caplog.text and "resize" in caplog.text
    assert bare.encode(PAD_TOKEN) == [bare.pad_token_id]  # one special token, never split


def test_load_tokenizer_adds_pad_to_a_folder_without_pad_or_eos(tok, tmp_path, caplog):
    _bare_tokenizer(tok).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rlhf_lab.models.tokenizer"):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == PAD_TOKEN and len(loaded) == len(tok) + 1
    assert "<|pad|>" in caplog.text


def test_local_gpt2_pads_on_the_left_for_generation():
    if not GPT2_DIR.is_dir():
        pytest.skip("../shared/data/gpt2-tokenizer not present")
    tok = load_tokenizer(str(GPT2_DIR))
    # Policy pads prompts on the left per call; the pad id is EOS and the mask hides it.
    enc = tok(["Hello world", "Hi"], padding=True, padding_side="left")
    assert enc["input_ids"][1][0] == tok.eos_token_id == tok.pad_token_id
    assert enc["attention_mask"] == [[1, 1], [0, 1]]


def test_hub_name_without_network_fails_fast_with_one_clear_error(no_network):
    with pytest.raises(OSError) as info:
        load_tokenizer("some-org/some-tokenizer")
    message = str(info.value)
    assert "'some-org/some-tokenizer'" in message
    assert "not found locally" in message and "no network" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # Our one probe of the hub, plus at most huggingface_hub's own user-agent lookup (made once per
    # process); a client that tried to download, with its backoff retries, would connect many times.
    assert 1 <= len(no_network) <= 2


def test_hub_probe_reports_offline_variable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub_unreachable_reason() == "TRANSFORMERS_OFFLINE is set"


def test_hub_probe_is_bounded_when_the_connection_hangs(monkeypatch):
    released = threading.Event()

    def hang(*args, **kwargs):  # a connect that never answers until the test lets it go
        released.wait()
        raise OSError("released")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        reason = hub_unreachable_reason(timeout=0.2)
    finally:
        released.set()
    # The probe returned while the connect was still hanging: it gave up after its bound.
    assert reason is not None and "no answer in 0.2 s" in reason
