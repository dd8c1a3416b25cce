"""Loggers and Trainers of a run: CSV by default, wandb with project/group/tags and the full config."""

import csv
import os

import pytest
import yaml

from rlhf_lab.runs import LoggerConfig, build_loggers, finish_loggers, make_trainer, plain_config
from rlhf_lab.stages import Pretrain, PretrainConfig


def _stage(make_policy, task):
    return Pretrain(make_policy(), task.pretrain_corpus(n_lines=200), None, PretrainConfig(batch_size=4, block_size=16))


def test_csv_is_the_default_and_records_the_full_config(make_policy, task, tmp_path):
    run_config = {"config": PretrainConfig(lr=1e-3), "data": {"path": "corpus.txt"}, "seed": 3}
    trainer = make_trainer(str(tmp_path), "pretrain", 3, run_config=run_config, enable_progress_bar=False)
    assert [type(lg).__name__ for lg in trainer.loggers] == ["RunCSVLogger"]
    trainer.fit(_stage(make_policy, task))
    with open(tmp_path / "pretrain" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["budget/optimizer_steps"]) for r in rows if r.get("budget/optimizer_steps")] == [1.0, 2.0, 3.0]
    with open(tmp_path / "pretrain" / "hparams.yaml") as f:
        hparams = yaml.safe_load(f)
    # The whole run config (nested dataclass as a dict) and the stage's own hyperparameters.
    assert hparams["stage"] == "pretrain"  # the LightningModule's save_hyperparameters
    assert hparams["data"] == {"path": "corpus.txt"} and hparams["seed"] == 3
    assert hparams["lr"] == PretrainConfig().lr  # the module's own config (the stage ran with defaults)


def test_plain_config_turns_dataclasses_and_tuples_into_yaml_types():
    assert plain_config({"a": (1, 2), "b": PretrainConfig(lr=0.5)})["b"]["lr"] == 0.5
    assert plain_config({"a": (1, 2)}) == {"a": [1, 2]}
    assert plain_config({"p": os.sep}) == {"p": os.sep}
    assert yaml.safe_load(yaml.safe_dump(plain_config({"x": object}))) == {"x": str(object)}


def test_logger_kinds(tmp_path):
    assert build_loggers("none", str(tmp_path), "sft") == []
    assert make_trainer(str(tmp_path), "sft", 1, logger="none", enable_progress_bar=False).loggers == []
    with pytest.raises(ValueError, match="kind"):
        LoggerConfig(kind="tensorboard")
    with pytest.raises(ValueError, match="tags"):
        LoggerConfig(tags="ppo")


def test_wandb_offline_without_an_api_key_with_project_group_tags_and_config(make_policy, task, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = LoggerConfig(kind="both", project="rlhf_lab_test", group="cmp-1", tags=["algorithm:ppo", "seed:2"])
    run_config = {"config": PretrainConfig(lr=1e-3), "seed": 2}
    trainer = make_trainer(str(tmp_path), "pretrain", 3, logger=config, run_config=run_config,
                           enable_progress_bar=False, run_id="resumable01")
    assert [type(lg).__name__ for lg in trainer.loggers] == ["RunCSVLogger", "WandbLogger"]
    try:
        trainer.fit(_stage(make_policy, task))
        run = trainer.loggers[1].experiment
        seen = dict(project=run.project, group=run.group, name=run.name, tags=sorted(run.tags),
                    offline=run.settings._offline, lr=run.config["config"]["lr"], seed=run.config["seed"],
                    block=run.config["config"]["block_size"], id=run.id)
    finally:
        finish_loggers(trainer)
    assert seen["offline"]
    assert (seen["project"], seen["group"], seen["name"]) == ("rlhf_lab_test", "cmp-1", "cmp-1-pretrain")
    assert seen["tags"] == ["algorithm:ppo", "pretrain", "seed:2"]
    assert (seen["lr"], seen["seed"], seen["block"]) == (1e-3, 2, 64)  # the run config, and the stage hparams beside it
    # Offline files: a run folder under <out>/wandb/ holding the config for `wandb sync`.
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    # The run id given (a resumed run passes the one it started with) names the wandb run.
    assert seen["id"] == "resumable01" and runs[0].endswith("-resumable01")
    # Offline runs keep the config in the .wandb record file (no config.yaml until synced).
    # wandb's writer is a separate process that may still be flushing the file after finish()
    # returns: read it again until the records are there, for at most a minute.
    import time

    records = [f for f in os.listdir(tmp_path / "wandb" / runs[0]) if f.endswith(".wandb")]
    deadline = time.monotonic() + 60
    while True:
        data = (tmp_path / "wandb" / runs[0] / records[0]).read_bytes()
        if (b"block_size" in data and b"cmp-1" in data) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert b"block_size" in data and b"cmp-1" in data
    assert os.path.exists(tmp_path / "pretrain" / "metrics.csv")
