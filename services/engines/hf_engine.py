"""The reference engine: transformers + PEFT, one request at a time.

Used where vLLM is absent and as the parity reference for the serving engine. Adapters live side by
side in one PeftModel; a lock serialises generation because the active adapter is global state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from services.engines.chat import load_tokenizer, opens_think, tokenized_prompt
from services.engines.protocol import AdapterHandle, ChatMessage, Generation, SamplingOptions

log = logging.getLogger("flywheel.engine.hf")


def load_causal_lm(path: str) -> Any:
    """The model as this engine runs it: on CPU with fp32 activations, GPTQ base or not.

    (A GPTQ checkpoint would otherwise load in bf16, which most CPUs only emulate.)
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_flush_denormal(True)  # random-init weights carry denormals that slow CPU matmuls ~6x
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class HFEngine:
    def __init__(self, base_model: str, *, max_model_len: int = 512) -> None:
        self.base_model = base_model
        self.max_model_len = max_model_len
        self._lock = asyncio.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._opens_think = False

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        log.info("event=engine_started engine=hf base=%s", self.base_model)

    def _load(self) -> None:
        self._tokenizer = load_tokenizer(self.base_model)
        self._opens_think = opens_think(self._tokenizer)
        self._model = load_causal_lm(self.base_model)

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        async with self._lock:
            await asyncio.to_thread(self._add, adapter)

    def _add(self, adapter: AdapterHandle) -> None:
        from peft import PeftModel

        if isinstance(self._model, PeftModel):
            if adapter.name in self._model.peft_config:  # immutable versions: already resident
                return
            self._model.load_adapter(str(adapter.path), adapter_name=adapter.name)
        else:
            self._model = PeftModel.from_pretrained(self._model, str(adapter.path), adapter_name=adapter.name)
        self._model.eval()

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        async with self._lock:
            if adapter.name in getattr(self._model, "peft_config", {}):
                remaining = [n for n in self._model.peft_config if n != adapter.name]
                if remaining:
                    self._model.set_adapter(remaining[0])
                    self._model.delete_adapter(adapter.name)

    async def generate(
        self,
        messages: list[ChatMessage],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
        request_id: str,
    ) -> Generation:
        prompt_ids = await tokenized_prompt(self._tokenizer, messages, options.max_tokens, self.max_model_len)
        async with self._lock:
            return await asyncio.to_thread(self._generate, prompt_ids, options, adapter)

    async def stream(
        self,
        messages: list[ChatMessage],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
        request_id: str,
    ) -> AsyncIterator[Generation]:
        """The reference engine answers whole: one piece."""
        yield await self.generate(messages, options, adapter, request_id)

    def _generate(
        self, prompt_ids: list[int], options: SamplingOptions, adapter: AdapterHandle | None
    ) -> Generation:
        import torch

        if options.seed is not None:
            torch.manual_seed(options.seed)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
            if options.temperature > 0
            else {"do_sample": False}
        )
        with torch.inference_mode(), self._adapter_context(adapter):
            output = self._model.generate(
                input_ids=torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=options.max_tokens,
                # the end of sequence is held back until then (vLLM's ignore_eos goes on past it: the same length)
                min_new_tokens=options.max_tokens if options.ignore_eos else options.min_tokens,
                pad_token_id=self._tokenizer.pad_token_id,
                **sampling,
            )
        new_ids = output[0, len(prompt_ids):].tolist()
        eos = self._tokenizer.eos_token_id
        finish = "stop" if eos in new_ids else "length"
        if eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos)]
        text = self._tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in options.stop) if i >= 0), default=-1)
        if cut >= 0:  # like vLLM: the text ends before the stop sequence
            text, finish = text[:cut], "stop"
        return Generation(
            text=text,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(new_ids) + (1 if finish == "stop" else 0),
            finish_reason=finish,
            opened_think=self._opens_think,
        )

    async def completion_logprob(
        self, messages: list[ChatMessage], completion: str, adapter: AdapterHandle | None
    ) -> tuple[float, int]:
        prompt_ids = await tokenized_prompt(self._tokenizer, messages, 1, self.max_model_len)
        target = self._tokenizer.encode(completion, add_special_tokens=False)
        async with self._lock:
            return await asyncio.to_thread(self._logprob, prompt_ids, target, adapter)

    def _logprob(self, prompt_ids: list[int], target: list[int], adapter: AdapterHandle | None) -> tuple[float, int]:
        import torch

        ids = (prompt_ids + target)[: self.max_model_len]
        with torch.inference_mode(), self._adapter_context(adapter):
            logits = self._model(input_ids=torch.tensor([ids])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scored = range(len(prompt_ids), len(ids))
        return float(sum(logprobs[i - 1, ids[i]] for i in scored)), len(scored)

    def _adapter_context(self, adapter: AdapterHandle | None) -> Any:
        """Select `adapter`, or disable adapters for the bare base (a no-op before any is loaded)."""
        import contextlib

        if adapter is not None:
            self._model.set_adapter(adapter.name)
            return contextlib.nullcontext()
        return self._model.disable_adapter() if hasattr(self._model, "disable_adapter") else contextlib.nullcontext()

    async def shutdown(self) -> None:
        self._model = None
