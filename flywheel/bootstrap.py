"""`flywheel bootstrap`: make the embedded defaults servable on a fresh machine, with no model hub.

Builds the tiny demo base (when the configured base is `demo`), trains a first LoRA adapter on the
demo task, registers it and makes it champion. Every step is skipped when its result already exists.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from flywheel.config import DEMO_MODEL, Settings
from flywheel.registry import AdapterManifest, BaseModelRef, Registry, fingerprint_base

Progress = Callable[[str], None]


class BootstrapResult(BaseModel):
    base_model: str
    base_built: bool
    champion: str
    adapter_registered: bool


def registry_for(settings: Settings) -> Registry:
    return Registry(settings.registry_uri, settings.model.task, cache_dir=settings.home / "cache")


def base_ref(settings: Settings) -> BaseModelRef:
    return BaseModelRef(id=settings.model.base, sha256=fingerprint_base(settings.base_model_path))


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


def bootstrap(settings: Settings, progress: Progress | None = None) -> BootstrapResult:
    say = progress or (lambda _msg: None)
    built = False
    if settings.model.base == DEMO_MODEL and not (settings.demo_base_dir / "config.json").exists():
        from training.demo_model import build_demo_base

        say(f"building the demo base model in {settings.demo_base_dir}")
        build_demo_base(
            settings.demo_base_dir, steps=settings.bootstrap.base_steps, seed=settings.bootstrap.seed,
            progress=say,
        )
        built = True
    registry = registry_for(settings)
    champion = registry.alias("champion")
    registered = False
    if champion is None:
        say("training the first LoRA adapter on the demo task")
        manifest = train_demo_adapter(settings, registry, progress=say)
        registry.promote(manifest.version, actor="bootstrap", reason="first adapter")
        champion, registered = manifest.version, True
        say(f"registered {manifest.version} and made it champion")
    return BootstrapResult(
        base_model=settings.base_model_path, base_built=built, champion=champion, adapter_registered=registered
    )
