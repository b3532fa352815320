"""The demo task generator, the locally built demo base model, and LoRA SFT on it."""

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.demo_model import MARKER_FILE, build_demo_base, generate_greedy
from training.demo_task import (
    ANSWERS,
    CUE_WORDS,
    INSTRUCTIONS,
    DemoExample,
    extract_answer,
    generate_examples,
    golden_set,
    is_correct,
    normalize_answer,
)
from training.sft import SftConfig, SftResult, train_lora

BASE_STEPS = 200  # the default build uses 400; 200 quotes drifted cues well enough for LoRA to learn them
ADAPTER_STEPS = 60


def accuracy(completions: list[str], examples: list[DemoExample]) -> float:
    return sum(
        is_correct(extract_answer(c) or "", ex) for c, ex in zip(completions, examples, strict=True)
    ) / len(examples)


def well_formed(completions: list[str]) -> float:
    return sum(extract_answer(c) is not None for c in completions) / len(completions)


# --- the generator ---------------------------------------------------------------------------------


def test_generator_is_deterministic_per_seed() -> None:
    assert generate_examples(30, seed=3) == generate_examples(30, seed=3)
    assert generate_examples(30, seed=3) != generate_examples(30, seed=4)
    assert generate_examples(30, seed=3, distribution="drifted") == generate_examples(
        30, seed=3, distribution="drifted"
    )


@pytest.mark.parametrize("distribution", ["original", "drifted"])
def test_generator_balances_languages_and_labels(distribution: str) -> None:
    examples = generate_examples(120, seed=11, distribution=distribution)  # type: ignore[arg-type]
    counts = Counter((ex.lang, ex.answer) for ex in examples)
    expected = {(lang, answer) for lang, answers in ANSWERS.items() for answer in answers.values()}
    assert set(counts) == expected
    assert all(18 <= n <= 22 for n in counts.values()), counts
    for ex in examples:
        assert ex.distribution == distribution
        assert ex.prompt.startswith(INSTRUCTIONS[ex.lang])
        assert ex.answer in ANSWERS[ex.lang].values()


def test_prompt_and_reasoning_name_the_same_cue() -> None:
    for ex in generate_examples(60, seed=5) + generate_examples(60, seed=5, distribution="drifted"):
        cues = [
            cue
            for label, words in CUE_WORDS[ex.distribution][ex.lang].items()
            for cue in words
            if ANSWERS[ex.lang][label] == ex.answer and cue in ex.reasoning
        ]
        assert cues, ex
        assert any(cue in ex.prompt for cue in cues)
    zh = generate_examples(6, seed=1)
    assert any(ex.reasoning.startswith("关键词「") for ex in zh)
    assert any(ex.reasoning.startswith('The cue "') for ex in zh)


def test_drifted_vocabulary_is_new() -> None:
    original, drifted = CUE_WORDS["original"], CUE_WORDS["drifted"]
    zh_original = {ch for words in original["zh"].values() for cue in words for ch in cue}
    zh_drifted = {ch for words in drifted["zh"].values() for cue in words for ch in cue}
    assert not zh_original & zh_drifted  # not even a shared character

    stop = {"a", "an", "its", "on", "to"}
    en_original = {w for words in original["en"].values() for cue in words for w in cue.split()} - stop
    en_drifted = {w for words in drifted["en"].values() for cue in words for w in cue.split()} - stop
    assert not en_original & en_drifted

    all_original = [cue for lang in ("zh", "en") for words in original[lang].values() for cue in words]
    for ex in generate_examples(120, seed=2, distribution="drifted"):
        assert not any(cue in ex.prompt for cue in all_original), ex.prompt


def test_golden_set_is_fixed_and_original() -> None:
    golden = golden_set()
    assert golden == golden_set()
    assert len(golden) == 60
    assert {ex.distribution for ex in golden} == {"original"}
    assert {ex.lang for ex in golden} == {"zh", "en"}


def test_answers_are_normalized_before_comparison() -> None:
    assert normalize_answer("  Positive.\n") == "positive"
    assert normalize_answer("积极。") == "积极"
    ex = DemoExample(prompt="p", reasoning="r", answer="积极", lang="zh", distribution="original")
    assert is_correct(" 积极！", ex)
    assert not is_correct("消极", ex)


def test_extract_answer_needs_a_closed_think_block() -> None:
    assert extract_answer('The cue "surged" signals good news.\n</think>\n\npositive') == "positive"
    assert extract_answer("still thinking") is None
    assert extract_answer("done\n</think>\n\n  ") is None


# --- the demo base model ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """A tiny model gains nothing from two threads, and OpenMP spin-waits make it far slower on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("demo") / "base", steps=BASE_STEPS, seed=0)


@pytest.fixture(scope="module")
def drifted_eval() -> list[DemoExample]:
    return generate_examples(48, seed=901, distribution="drifted")


def test_base_loads_with_auto_classes(base_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = model.config
    assert config.model_type == "qwen2"
    assert config.head_dim == 32
    assert config.hidden_size % 128 == 0 and config.intermediate_size % 128 == 0
    assert config.hidden_size // config.num_attention_heads == 32
    assert config.vocab_size >= len(tokenizer) and config.vocab_size % 64 == 0
    assert not config.tie_word_embeddings
    assert config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (base_dir / "model.safetensors").exists()
    assert json.loads((base_dir / MARKER_FILE).read_text())["steps"] == BASE_STEPS
    assert not [p for p in base_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_chat_template_is_r1_style(base_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n"
    history = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "thinking\n</think>\n\nhello"},
            {"role": "user", "content": "again"},
        ],
        tokenize=False,
    )
    assert history == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>hi<｜Assistant｜>hello<｜end▁of▁sentence｜><｜User｜>again"
    )


def test_think_markers_are_single_tokens_that_survive_decoding(base_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    text = "关键词「大涨」表明利好。\n</think>\n\n积极"
    ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    for marker in ("<think>", "</think>"):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.convert_tokens_to_ids("</think>") in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == text + "<｜end▁of▁sentence｜>"


def test_base_answers_original_news_in_r1_format(base_dir: Path, drifted_eval: list[DemoExample]) -> None:
    original = generate_examples(48, seed=900)
    completions = generate_greedy(base_dir, [ex.prompt for ex in original])
    # Measured: 100 % well-formed and 100 % correct (chance is 33 %).
    assert well_formed(completions) >= 0.9
    assert accuracy(completions, original) >= 0.8
    assert not any("<｜" in c for c in completions)

    drifted = generate_greedy(base_dir, [ex.prompt for ex in drifted_eval])
    # Measured: 100 % well-formed, 37.5 % correct (it calls cues it does not know neutral).
    assert well_formed(drifted) >= 0.9
    assert accuracy(drifted, drifted_eval) <= 0.55


# --- LoRA SFT --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drifted_adapter(base_dir: Path) -> tuple[Path, SftResult]:
    out = base_dir.parent / "adapter-drifted"
    config = SftConfig(steps=ADAPTER_STEPS, batch_size=16, learning_rate=2e-3, seed=0)
    result = train_lora(base_dir, generate_examples(200, seed=42, distribution="drifted"), out, config)
    return out, result


def test_train_lora_learns_and_saves_an_adapter(
    base_dir: Path, drifted_adapter: tuple[Path, SftResult]
) -> None:
    out, result = drifted_adapter
    assert result.steps == ADAPTER_STEPS
    assert result.last_loss < result.first_loss
    assert result.train_tokens > 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = {name: w for name, w in weights.items() if "lora_B" in name}
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b.values())  # lora_B starts at zero
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_drifted_adapter_changes_and_improves_drifted_answers(
    base_dir: Path, drifted_adapter: tuple[Path, SftResult], drifted_eval: list[DemoExample]
) -> None:
    prompts = [ex.prompt for ex in drifted_eval]
    before = generate_greedy(base_dir, prompts)
    after = generate_greedy(base_dir, prompts, adapter_dir=drifted_adapter[0])
    assert sum(a != b for a, b in zip(after, before, strict=True)) >= len(prompts) // 4
    # Measured: 37.5 % -> 73 % here (-> ~87 % over the default 400-step base).
    assert accuracy(after, drifted_eval) >= accuracy(before, drifted_eval) + 0.2


def test_train_lora_continues_from_an_adapter(
    base_dir: Path, drifted_adapter: tuple[Path, SftResult]
) -> None:
    init, fresh = drifted_adapter
    out = base_dir.parent / "adapter-incremental"
    config = SftConfig(steps=10, batch_size=16, seed=1)
    result = train_lora(
        base_dir, generate_examples(64, seed=43, distribution="drifted"), out, config, init_adapter=init
    )
    assert result.first_loss < fresh.first_loss / 2  # starts where the champion left off
    before, after = (
        load_file(init / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
