"""The embedded demo base model: a tiny Qwen2 with an R1-style chat template, built and trained locally.

No model hub is involved: the tokenizer is a byte-level BPE trained on demo-task text, the model is
randomly initialised and fully fine-tuned until it answers in the R1 format
`reasoning\\n</think>\\n\\nanswer<｜end▁of▁sentence｜>`. It knows the sentiment of the original cues only;
drifted cues it can read and quote but calls neutral, like any cue it does not know.
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

from flywheel.config import DEMO_CONTEXT
from training.demo_task import LANGS, QUOTES, DemoExample, Lang, generate_examples, make_example
from training.sft import THINK_END, atomic_dir, collate, completion_text, encode_example, prompt_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
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


_PSEUDO_SYLLABLES: dict[Lang, tuple[str, ...]] = {
    "zh": tuple("甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉戌亥"),
    "en": ("ka", "lo", "mi", "zu", "te", "ra", "vo", "ne", "shi", "po", "dak", "rin"),
}


class DemoBuildInfo(BaseModel):
    """Contents of the `flywheel_demo.json` marker."""

    seed: int
    steps: int
    final_loss: float
    seconds: float


def _corpus(seed: int) -> Iterator[str]:
    """Demo-task text from both distributions, so drifted words get their own merges."""
    for ex in [
        *generate_examples(3000, seed=seed, distribution="original"),
        *generate_examples(3000, seed=seed, distribution="drifted"),
        *_unfamiliar_examples(1000, seed),
    ]:
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
        model_max_length=DEMO_CONTEXT,
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
        max_position_embeddings=DEMO_CONTEXT,
        tie_word_embeddings=False,
        dtype="float32",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _encode_cue_quote(tokenizer: PreTrainedTokenizerFast, example: DemoExample) -> dict[str, list[int]]:
    """The chat up to the quoted cue (`...<think>\n关键词「cue」`), without the sentiment that follows."""
    opening = example.reasoning.index(QUOTES[example.lang][0])
    quote = example.reasoning[: example.reasoning.index(QUOTES[example.lang][1], opening + 1) + 1]
    ids = tokenizer(prompt_text(tokenizer, example.prompt) + quote, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "labels": ids}


def _unfamiliar_examples(n: int, seed: int) -> list[DemoExample]:
    """Neutral chats around made-up cues, so the base reads a cue it does not know as neutral."""
    rng = random.Random(f"unfamiliar:{seed}")
    examples = []
    for _ in range(n):
        lang = rng.choice(LANGS)
        parts = [rng.choice(_PSEUDO_SYLLABLES[lang]) for _ in range(rng.randint(2, 3))]
        cue = "".join(parts) if lang == "zh" else " ".join(parts)
        distribution = rng.choice(("original", "drifted"))
        examples.append(make_example(rng, lang, "neutral", distribution, cue=cue))
    return examples


def _cosine_with_warmup(steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over 5 % of the steps, then cosine from 1.0 down to 0.1."""
    warmup = max(1, steps // 20)
    return lambda step: min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))


def _train_base(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int,
    seed: int,
    progress: Callable[[str], None] | None,
) -> float:
    """Full fine-tune; returns the last loss.

    A batch holds 24 original-distribution chats, 8 neutral chats around made-up cues, and 8 chats from
    either distribution cut after the quoted cue: the base learns to quote any cue, drifted ones included
    (as a pretrained model knows the words), and the sentiment of the original cues only.
    """
    rng = random.Random(seed)
    chats = [*generate_examples(steps * 24, seed=seed), *_unfamiliar_examples(steps * 8, seed)]
    rng.shuffle(chats)
    quotes = [
        *generate_examples(steps * 4, seed=seed + 1),
        *generate_examples(steps * 4, seed=seed + 1, distribution="drifted"),
    ]
    rng.shuffle(quotes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        features = [encode_example(tokenizer, ex, 128) for ex in chats[step * 32 : (step + 1) * 32]]
        features += [_encode_cue_quote(tokenizer, ex) for ex in quotes[step * 8 : (step + 1) * 8]]
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
