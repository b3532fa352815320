"""`flywheel adapters import`: an adapter trained elsewhere is registered only when it fits the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.registry import MANIFEST, registry_for
from tests.conftest import make_settings


def foreign_adapter(tmp_path: Path) -> Path:
    """A LoRA made on another (narrower) Qwen2: same module names, other shapes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32))
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    out = tmp_path / "foreign"
    peft.save_pretrained(out)
    return out


def test_an_adapter_for_another_base_is_refused_with_the_reason(cli: CliRunner, home_copy: Path,
                                                                  tmp_path: Path) -> None:
    result = cli.invoke(app, ["adapters", "import", "--task", "demo", str(foreign_adapter(tmp_path))])
    assert result.exit_code == 2, result.output
    assert "trained on another base" in result.stderr and "features" in result.stderr, result.stderr
    registry = registry_for(make_settings(home_copy), "demo")
    assert [m.version for m in registry.versions()] == ["demo-v1", "demo-v2"]  # nothing registered

    unknown = cli.invoke(app, ["adapters", "import", "--task", "nope", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown task" in unknown.stderr


def test_an_adapter_that_fits_is_registered_ready_beside_the_champion(cli: CliRunner, home_copy: Path,
                                                                       tmp_path: Path) -> None:
    registry = registry_for(make_settings(home_copy), "demo")
    copy = tmp_path / "trained-elsewhere"
    shutil.copytree(registry.local_path("demo-v2"), copy)
    (copy / MANIFEST).unlink()
    result = cli.invoke(app, ["adapters", "import", "--task", "demo", str(copy), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["version"] == "demo-v3" and payload["champion"] is False
    assert payload["lora"]["matrices_checked"] > 0
    assert registry.manifest("demo-v3").status == "ready" and registry.alias("champion") == "demo-v1"


def test_an_import_names_the_champion_it_replaces_and_leaves_one_made_meanwhile(
        cli: CliRunner, home_copy: Path, tmp_path: Path, monkeypatch) -> None:
    """`--promote` decided against demo-v1; someone promotes demo-v2 while the import registers: the import is
    registered ready, not champion, and says why (it used to overwrite the promotion made meanwhile)."""
    from flywheel.registry import Registry

    registry = registry_for(make_settings(home_copy), "demo")
    copy = tmp_path / "trained-elsewhere"
    shutil.copytree(registry.local_path("demo-v2"), copy)
    (copy / MANIFEST).unlink()
    register = Registry.register

    def register_then_someone_promotes(self, *args, **kwargs):
        manifest = register(self, *args, **kwargs)
        Registry.promote(self, "demo-v2", actor="someone else", reason="meanwhile")
        return manifest

    monkeypatch.setattr(Registry, "register", register_then_someone_promotes)
    result = cli.invoke(app, ["adapters", "import", "--task", "demo", str(copy), "--promote"])
    assert result.exit_code == 1, result.output
    assert "not made champion" in result.stderr and "demo-v2" in result.stderr, result.stderr
    assert registry.alias("champion") == "demo-v2" and registry.manifest("demo-v3").status == "ready"
