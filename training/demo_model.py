"""The embedded demo base model: a tiny Qwen2 with an R1-style chat template, built and trained locally.

No model hub is involved: the tokenizer is a byte-level BPE trained on demo-task text, the model is
randomly initialised and fully fine-tuned on the original distribution until it answers in the R1
format `reasoning\\n</think>\\n\\nanswer<｜end▁of▁sentence｜>`.
"""

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import PeftModel
from pydantic import BaseModel
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from training.demo_task import generate_examples
from training.sft import atomic_dir, collate, completion_text, encode_example, prompt_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
THINK_END = "</think>"
GENERATION_PROMPT = f"{ASSISTANT}{THINK}\n"
MARKER_FILE = "flywheel_demo.json"
VOCAB_SIZE = 3000

# DeepSeek-R1's template, reduced: the system text goes first, earlier assistant turns keep only
# their answer (the part after </think>), and the generation prompt opens the think block.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages if message['role'] == 'system' %}{{ message['content'] }}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '" + ASSISTANT + "' + content + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + GENERATION_PROMPT.replace("\n", "\\n") + "' }}{% endif %}"
)


class DemoBuildInfo(BaseModel):
    """Contents of the `flywheel_demo.json` marker."""

    seed: int
    steps: int
    final_loss: float
    seconds: float


def _corpus(seed: int) -> Iterator[str]:
    """Demo-task text from both distributions, so drifted words get their own merges."""
    for distribution in ("original", "drifted"):
        for ex in generate_examples(3000, seed=seed, distribution=distribution):
            yield ex.prompt
            yield completion_text(ex.reasoning, ex.answer)


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the R1 special tokens and chat template."""
    backend = Tokenizer(models.BPE())
    # Han characters stand alone (as in word-level BPE they would fuse company, date and cue into one
    # token); English is split GPT-2 style.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(seed), trainer)
    # Plain added tokens: single ids, yet kept by decode(skip_special_tokens=True), which serving needs.
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, THINK_END)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """The tiny Qwen2 shape: sizes that vLLM's CPU attention and GPTQ Marlin kernels accept."""
    return Qwen2Config(
        vocab_size=64 * math.ceil(len(tokenizer) / 64),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        dtype="float32",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _encode_news(tokenizer: PreTrainedTokenizerFast, text: str) -> dict[str, list[int]]:
    """Plain language-model sample: BOS + text + EOS, loss everywhere."""
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": ids}


def _train_base(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int,
    seed: int,
    progress: Callable[[str], None] | None,
) -> float:
    """Full fine-tune; returns the last loss.

    Each batch holds chat-formatted original-distribution examples plus unlabeled news from both
    distributions: the base learns the drifted words (as a pretrained model would) but not their sentiment.
    """
    chat_size, news_size, peak_lr, warmup = 32, 8, 3e-3, max(1, steps // 20)
    chats = generate_examples(steps * chat_size, seed=seed)
    news = [
        ex.prompt
        for distribution in ("original", "drifted")
        for ex in generate_examples(steps * news_size // 2, seed=seed + 1, distribution=distribution)
    ]
    random.Random(seed).shuffle(news)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))),
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        features = [encode_example(tokenizer, ex, 128) for ex in chats[step * chat_size : (step + 1) * chat_size]]
        features += [_encode_news(tokenizer, text) for text in news[step * news_size : (step + 1) * news_size]]
        loss = model(**collate(features, tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress and (step % 50 == 0 or step == steps - 1):
            progress(f"demo-base step={step + 1}/{steps} loss={loss.item():.4f}")
    model.eval()
    return loss.item()


def build_demo_base(
    out_dir: Path, *, steps: int = 400, seed: int = 0, progress: Callable[[str], None] | None = None
) -> Path:
    """Build the tokenizer and tiny Qwen2, train it, and write both atomically to `out_dir`."""
    started = time.perf_counter()
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(seed)
    model = Qwen2ForCausalLM(build_config(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    final_loss = _train_base(model, tokenizer, steps=steps, seed=seed, progress=progress)
    info = DemoBuildInfo(seed=seed, steps=steps, final_loss=final_loss, seconds=time.perf_counter() - started)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(info.model_dump(), indent=2) + "\n")
    if progress:
        progress(f"demo-base built dir={out_dir} seconds={info.seconds:.1f} loss={final_loss:.4f}")
    return out_dir


@torch.inference_mode()
def generate_greedy(
    model_dir: Path,
    prompts: list[str],
    *,
    adapter_dir: Path | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> list[str]:
    """Reference greedy completions (text after the generation prompt, special tokens skipped)."""
    torch.set_flush_denormal(True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return completions
