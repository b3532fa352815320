"""`flywheel bootstrap`: make the embedded defaults servable on a fresh machine, with no model hub.

Builds the tiny demo base (when the configured base is `demo`) and, when the demo task is one of the
configured tasks, stores its spec and golden set, trains a first LoRA adapter on it, registers it and
makes it champion. A real base never gets a demo adapter: its tasks are trained from their own data
(`flywheel train`). Every step is skipped when its result already exists.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from flywheel.bases import base_ref
from flywheel.config import DEMO_MODEL, Settings
from flywheel.registry import AdapterManifest, ChampionChangedError, Registry, registry_for
from flywheel.tasks import DEMO_TASK

Progress = Callable[[str], None]


class BootstrapResult(BaseModel):
    base_model: str
    base_built: bool
    champion: str | None = None
    adapter_registered: bool = False


def train_demo_adapter(
    settings: Settings,
    registry: Registry,
    *,
    distribution: str = "original",
    seed: int | None = None,
    steps: int | None = None,
    progress: Progress | None = None,
) -> AdapterManifest:
    """Train a LoRA adapter on demo-task examples and register it (not promoted)."""
    from training.demo_task import generate_examples
    from training.retrain_data import TrainExample, write_train_data
    from training.sft import SftConfig, train_lora

    seed = settings.bootstrap.seed if seed is None else seed
    config = SftConfig(steps=steps or settings.bootstrap.adapter_steps, seed=seed)
    examples = generate_examples(settings.bootstrap.train_examples, seed=seed + 1,
                                 distribution=distribution)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="flywheel-adapter-") as scratch:
        out = Path(scratch) / "adapter"
        result = train_lora(Path(settings.base_model_path), examples, out, config, progress=progress)
        write_train_data(out, [TrainExample(prompt=e.prompt, reasoning=e.reasoning, answer=e.answer,
                                            source="bootstrap") for e in examples])  # replayed by retrains
        return registry.register(
            out,
            base=base_ref(settings),
            lora=config.lora.model_dump(),
            training={"method": "sft", **config.model_dump(exclude={"lora"}), "source": "bootstrap"},
            data={"generator": "demo_task", "distribution": distribution, "examples": len(examples)},
            metrics={"first_loss": result.first_loss, "last_loss": result.last_loss},
        )


def ensure_demo_base(settings: Settings, progress: Progress | None = None) -> bool:
    """Build the demo base when it is the configured base and not built yet (only the base: no adapter);
    whether it was built now."""
    if settings.model.base != DEMO_MODEL or (settings.demo_base_dir / "config.json").exists():
        return False
    from training.demo_model import build_demo_base

    say = progress or (lambda _msg: None)
    say(f"building the demo base model in {settings.demo_base_dir}")
    build_demo_base(
        settings.demo_base_dir, steps=settings.bootstrap.base_steps, seed=settings.bootstrap.seed, progress=say,
    )
    return True


def bootstrap(settings: Settings, progress: Progress | None = None) -> BootstrapResult:
    say = progress or (lambda _msg: None)
    built = ensure_demo_base(settings, say)
    if settings.model.base != DEMO_MODEL or DEMO_TASK.name not in {t.name for t in settings.tasks}:
        return BootstrapResult(base_model=settings.base_model_path, base_built=built)
    registry = registry_for(settings, DEMO_TASK.name)
    if registry.golden_text() is None:
        from training.demo_task import golden_set

        registry.save_task_spec(next(t for t in settings.tasks if t.name == DEMO_TASK.name))
        registry.save_golden("".join(
            json.dumps({"messages": [{"role": "user", "content": e.prompt}], "reasoning": e.reasoning,
                        "answer": e.answer, "line": i + 1}, ensure_ascii=False) + "\n"
            for i, e in enumerate(golden_set())))
    champion = registry.alias("champion")
    registered = False
    if champion is None:
        say("training the first LoRA adapter on the demo task")
        manifest = train_demo_adapter(settings, registry, progress=say)
        registered = True
        try:  # only over no champion: a bootstrap racing this one may have promoted its own first
            registry.promote(manifest.version, actor="bootstrap", reason="first adapter", expected_champion=None)
            champion = manifest.version
            say(f"registered {manifest.version} and made it champion")
        except ChampionChangedError:
            champion = registry.alias("champion")
            say(f"registered {manifest.version}; {champion} became champion meanwhile and stays")
    return BootstrapResult(
        base_model=settings.base_model_path, base_built=built, champion=champion, adapter_registered=registered
    )
