"""Start-up stays light: the package, the tasks and the CLI's name lists import without torch.

Each check runs in a fresh interpreter, since this test process has long imported everything.
"""

import importlib
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "lightning", "peft", "torchmetrics")


def imported_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; return its `result` and which HEAVY modules it loaded."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(dict(result=result, loaded=[m for m in {HEAVY!r} if m in sys.modules])))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_tasks_configs_and_cli_names_import_without_torch():
    found = imported_after(
        "import rlhf_lab\n"
        "import rlhf_lab.tasks\n"
        "from rlhf_lab.tasks import TASKS, get_task\n"
        "from rlhf_lab.data import FORMATS, STAGE_KINDS\n"
        "from rlhf_lab.data.spec import DataConfig\n"
        "DataConfig(format='dolly', path='rows.jsonl')\n"
        "from rlhf_lab.models.backbones import TINY_CONFIGS, TOY_NAMES, backbone_names\n"
        "from rlhf_lab.models.lora import LoraSettings\n"
        "LoraSettings(r=4)\n"
        "result = dict(tasks=list(TASKS), formats=list(FORMATS), backbones=backbone_names(),\n"
        "              prompt=get_task('arithmetic').eval_prompts()[0])"
    )
    assert found["loaded"] == []
    result = found["result"]
    assert result["tasks"] == ["arithmetic", "alice"]
    assert "prompt_completion" in result["formats"]
    assert result["backbones"][:3] == ["gpt2-tiny", "llama-tiny", "opt-tiny"]
    assert result["prompt"].startswith("Q:")


def test_policy_imports_neither_lightning_nor_peft_nor_torchmetrics():
    found = imported_after("import rlhf_lab.policy\nresult = None")
    assert set(found["loaded"]) == {"torch", "transformers"}


def test_data_exports_every_name_lazily():
    import rlhf_lab.data as data

    for name in data.__all__:  # each lazy name is the object its defining submodule holds
        module = importlib.import_module(f"rlhf_lab.data.{data._EXPORTS[name]}")
        assert getattr(data, name) is getattr(module, name), name
    assert set(data.__all__) <= set(dir(data))
    with pytest.raises(AttributeError, match="no_such_name"):
        data.no_such_name  # noqa: B018
