"""Check that a PEFT adapter trained elsewhere fits the configured base before it is registered.

Reads only headers: the adapter's config and its LoRA matrices' shapes, and the base's module shapes
from its safetensors headers, so a 7B base costs no memory. A LoRA `A` of a module is [r, in_features]
and its `B` is [out_features, r]; both must match the base module they adapt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open

LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight")


class AdapterImportError(Exception):
    """The adapter cannot serve on this base; the message says what does not fit."""


def _base_dir(base: str) -> Path:
    path = Path(base)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:
        raise AdapterImportError(f"cannot read the base model {base!r}: {exc}") from exc


def _shapes(files: list[Path]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


def check_adapter_fits(adapter_dir: Path, base: str) -> dict[str, Any]:
    """Raise AdapterImportError unless every LoRA matrix in `adapter_dir` fits a module of `base`.

    Returns the adapter's LoRA shape (r, alpha, target modules) for the manifest.
    """
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterImportError(f"{adapter_dir} is not a PEFT adapter: adapter_config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterImportError(f"adapter_config.json is not valid JSON: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterImportError(f"only LoRA adapters are served; this one is {config.get('peft_type')}")
    weights = sorted(adapter_dir.glob("adapter_model*.safetensors"))
    if not weights:
        raise AdapterImportError(f"{adapter_dir} has no adapter_model.safetensors")
    base_files = sorted(_base_dir(base).glob("*.safetensors"))
    if not base_files:
        raise AdapterImportError(f"the base {base} has no safetensors weights to check the adapter against")
    base_shapes = _shapes(base_files)
    checked = 0
    for key, shape in _shapes(weights).items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            continue
        module = match["module"]
        target = base_shapes.get(f"{module}.weight") or base_shapes.get(f"{module.removeprefix('model.')}.weight")
        if target is None:
            raise AdapterImportError(f"the adapter adapts {module}, which the base {base} does not have")
        out_features, in_features = target[0], target[-1]
        expected = in_features if match["which"] == "A" else out_features
        actual = shape[1] if match["which"] == "A" else shape[0]
        if actual != expected:
            raise AdapterImportError(
                f"the adapter was trained on another base: {module} has "
                f"{'in' if match['which'] == 'A' else 'out'} features {actual} in the adapter but {expected} "
                f"in the base {base}"
            )
        checked += 1
    if not checked:
        raise AdapterImportError("the adapter holds no LoRA weights")
    return {"r": config.get("r"), "alpha": config.get("lora_alpha"), "target_modules": config.get("target_modules"),
            "base_model_name_or_path": config.get("base_model_name_or_path"), "matrices_checked": checked}
