"""Which base weights serve: the configured base model, or a quantized base version from the registry.

Serving, the gate and `flywheel status` all ask here, so the engine that answers users and the one
that judges candidates always run on the same weights.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from flywheel.config import DEMO_CONTEXT, DEMO_MODEL, Settings
from flywheel.registry import BaseModelRef, Registry, fingerprint_base
from flywheel.tasks import TaskSpec


class ServedBase(BaseModel):
    path: str = Field(description="What the engine loads.")
    label: str = Field(description="The base as people name it: `demo`, a hub id, or a base version.")
    source_sha256: str = Field(description="Fingerprint of the unquantized base that adapters are trained on.")
    quantized: str | None = Field(None, description="The base version name when serving a quantized base.")
    quantization: dict[str, object] = Field(default_factory=dict, description="method, bits, group size.")


def served_base(settings: Settings, registry: Registry) -> ServedBase:
    """The base serving runs on, checked: a quantized base must be ready and made from `model.base`.

    Raises flywheel.registry.BaseRefusedError (or VersionNotFoundError) with a message that says why.
    """
    source_sha256 = fingerprint_base(settings.base_model_path)
    name = settings.model.quantized_base
    if name is None:
        return ServedBase(path=settings.base_model_path, label=settings.model.base, source_sha256=source_sha256)
    path, manifest = registry.base_path(name, source_sha256=source_sha256)
    return ServedBase(
        path=str(path), label=name, source_sha256=source_sha256, quantized=name,
        quantization={"method": manifest.method, **manifest.quantization},
    )


def context_length(settings: Settings) -> int:
    """Tokens of context the engines serve with: `vllm.max_model_len`, else the base model's own (the demo
    base's is known before it is built). Raises OSError when the base cannot be read."""
    if settings.vllm.max_model_len is not None:
        return settings.vllm.max_model_len
    if settings.model.base == DEMO_MODEL:
        return DEMO_CONTEXT
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(settings.base_model_path)
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def budget_problem(settings: Settings, task: TaskSpec) -> str | None:
    """Why `task`'s budgets cannot fit the serving context, or None when they do."""
    context = context_length(settings)
    if task.max_new_tokens >= context:
        return (f"task {task.name}: max_new_tokens {task.max_new_tokens} leaves no room for a prompt in the "
                f"{context}-token context (vllm.max_model_len); lower the task's budget or raise the context")
    if task.max_seq_len > context:
        return (f"task {task.name}: max_seq_len {task.max_seq_len} is longer than the {context}-token context "
                "(vllm.max_model_len): the model could not serve what it was trained on")
    return None


def fitting_budgets(context: int | None) -> tuple[int, int]:
    """(max_new_tokens, max_seq_len) for a new task: the task defaults, cut to fit a `context`-token window
    (an answer gets at most a quarter of it, a training row all of it); None: the defaults."""
    fields = TaskSpec.model_fields
    max_new_tokens, max_seq_len = fields["max_new_tokens"].default, fields["max_seq_len"].default
    if context is None:
        return max_new_tokens, max_seq_len
    return min(max_new_tokens, context // 4), min(max_seq_len, context)


def base_ref(settings: Settings) -> BaseModelRef:
    """The unquantized base adapters are trained against, as their manifests name it."""
    return BaseModelRef(id=settings.model.base, sha256=fingerprint_base(settings.base_model_path))
