"""The production engine: vLLM's AsyncLLM with LoRA enabled.

Adapters are added and removed through `AsyncLLM.add_lora` / `remove_lora` directly (vLLM's runtime
LoRA HTTP routes are dev-only). Each version has its own LoRA name and int id, so vLLM's caches keyed
by either can never serve one version's state for another.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator

from services.engines.chat import load_tokenizer, opens_think, tokenized_prompt
from services.engines.protocol import (
    AdapterHandle,
    ChatMessage,
    EngineError,
    Generation,
    SamplingOptions,
    collect,
)

log = logging.getLogger("flywheel.engine.vllm")


def _checkpoint_dtype(model: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype else "auto"


class VLLMEngine:
    def __init__(
        self,
        base_model: str,
        *,
        dtype: str = "auto",
        max_model_len: int = 512,
        max_loras: int = 3,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 16,
        max_num_seqs: int = 64,
        gpu_memory_utilization: float = 0.85,
        quantization: str | None = None,
        cpu_kvcache_gib: int = 1,
        enforce_eager: bool = True,
    ) -> None:
        self.base_model = base_model
        self.max_model_len = max_model_len
        self._engine_kwargs = dict(
            model=base_model,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_lora=True,
            max_loras=max_loras,
            max_cpu_loras=max(max_loras, max_cpu_loras or max_loras),
            max_lora_rank=max_lora_rank,
            max_num_seqs=max_num_seqs,
            quantization=quantization,
            enforce_eager=enforce_eager,
        )
        self._gpu_memory_utilization = gpu_memory_utilization
        self._cpu_kvcache_gib = cpu_kvcache_gib
        self._engine = None
        self._tokenizer = None
        self._opens_think = False

    async def start(self) -> None:
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(self._engine_kwargs)
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = self._gpu_memory_utilization
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self._cpu_kvcache_gib))
            if kwargs["dtype"] == "auto":  # vLLM's CPU "auto" turns fp32 into bf16; keep the checkpoint's
                kwargs["dtype"] = _checkpoint_dtype(self.base_model)
        self._tokenizer = load_tokenizer(self.base_model)
        self._opens_think = opens_think(self._tokenizer)
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        log.info("event=engine_started engine=vllm base=%s", self.base_model)

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        added = await self._llm.add_lora(self._lora_request(adapter))
        if not added and adapter.int_id not in await self._llm.list_loras():
            raise EngineError(f"vLLM refused to load adapter {adapter.name}")

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        await self._llm.remove_lora(adapter.int_id)

    async def generate(
        self,
        messages: list[ChatMessage],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
        request_id: str,
    ) -> Generation:
        # One output when the request ends: vLLM builds no per-token delta nobody reads (as its own server does
        # for a request that does not stream), which takes about a tenth off a short answer's latency on CPU.
        return await collect(self._outputs(messages, options, adapter, request_id, stream=False), request_id)

    def stream(
        self,
        messages: list[ChatMessage],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
        request_id: str,
    ) -> AsyncIterator[Generation]:
        return self._outputs(messages, options, adapter, request_id, stream=True)

    async def _outputs(
        self,
        messages: list[ChatMessage],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
        request_id: str,
        *,
        stream: bool,
    ) -> AsyncIterator[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        prompt_ids = await tokenized_prompt(self._tokenizer, messages, options.max_tokens, self.max_model_len)
        params = SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=options.stop or None,
            min_tokens=options.min_tokens,
            ignore_eos=options.ignore_eos,
            # a stream's outputs hold only the new tokens (nothing re-sent); otherwise one output, the whole text
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )
        produced = 0
        async for output in self._llm.generate(
            TokensPrompt(prompt_token_ids=prompt_ids),
            params,
            request_id,
            lora_request=self._lora_request(adapter) if adapter else None,
        ):
            if not output.outputs:
                continue
            piece = output.outputs[0]
            produced += len(piece.token_ids)
            yield Generation(
                text=piece.text,
                prompt_tokens=len(prompt_ids),
                completion_tokens=produced,
                finish_reason=piece.finish_reason,
                opened_think=self._opens_think,
            )

    async def completion_logprob(
        self, messages: list[ChatMessage], completion: str, adapter: AdapterHandle | None
    ) -> tuple[float, int]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt_ids = await tokenized_prompt(self._tokenizer, messages, 1, self.max_model_len)
        target = self._tokenizer.encode(completion, add_special_tokens=False)
        ids = (prompt_ids + target)[: self.max_model_len - 1]
        final = None
        async for output in self._llm.generate(
            TokensPrompt(prompt_token_ids=ids),
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
            f"score-{uuid.uuid4().hex}",
            lora_request=self._lora_request(adapter) if adapter else None,
        ):
            final = output
        if final is None or final.prompt_logprobs is None:
            raise EngineError("vLLM returned no prompt logprobs")
        scored = range(len(prompt_ids), len(ids))
        total = sum(final.prompt_logprobs[i][ids[i]].logprob for i in scored)
        return total, len(scored)

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    @property
    def _llm(self):
        if self._engine is None:
            raise EngineError("engine not started")
        return self._engine

    @staticmethod
    def _lora_request(adapter: AdapterHandle):
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.int_id, lora_path=str(adapter.path))
