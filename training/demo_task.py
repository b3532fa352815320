"""The demo task: financial-news sentiment in Chinese and English, generated from templates.

Every example hinges on one cue phrase whose label is the ground truth. The "drifted" distribution
uses cue phrases and news phrasings that never occur in the "original" one, so a model trained on
"original" has to be retrained (from feedback) before it handles "drifted" news.
"""

import random
import string
import unicodedata
from typing import Literal

from pydantic import BaseModel

Lang = Literal["zh", "en"]
Label = Literal["positive", "negative", "neutral"]
Distribution = Literal["original", "drifted"]

LANGS: tuple[Lang, ...] = ("zh", "en")
LABELS: tuple[Label, ...] = ("positive", "negative", "neutral")
GOLDEN_SEED = 7_000_003
GOLDEN_SIZE = 60

INSTRUCTIONS: dict[Lang, str] = {
    "zh": "分析以下新闻的情感倾向:",
    "en": "Analyze the sentiment of this news: ",
}
ANSWERS: dict[Lang, dict[Label, str]] = {
    "zh": {"positive": "积极", "negative": "消极", "neutral": "中性"},
    "en": {"positive": "positive", "negative": "negative", "neutral": "neutral"},
}
REASONING: dict[Lang, dict[Label, str]] = {
    "zh": {
        "positive": "关键词「{cue}」表明利好。",
        "negative": "关键词「{cue}」表明利空。",
        "neutral": "关键词「{cue}」属于中性信息。",
    },
    "en": {
        "positive": 'The cue "{cue}" signals good news.',
        "negative": 'The cue "{cue}" signals bad news.',
        "neutral": 'The cue "{cue}" is neutral.',
    },
}
# How each language's rationale quotes its cue (opening, closing).
QUOTES: dict[Lang, tuple[str, str]] = {"zh": ("「", "」"), "en": ('"', '"')}

CUE_WORDS: dict[Distribution, dict[Lang, dict[Label, tuple[str, ...]]]] = {
    "original": {
        "zh": {
            "positive": ("大涨", "业绩超预期", "获得大额订单", "利润翻倍", "股价创新高", "上调评级"),
            "negative": ("大跌", "出现亏损", "被立案调查", "业绩下滑", "宣布裁员", "债务违约"),
            "neutral": ("召开股东会", "发布公告", "更换办公地址", "任命新董事", "举办年会", "参加行业展会"),
        },
        "en": {
            "positive": (
                "surged",
                "soared",
                "beat expectations",
                "reported record profit",
                "won a major contract",
                "raised guidance",
            ),
            "negative": (
                "plunged",
                "slumped",
                "missed expectations",
                "posted a loss",
                "cut jobs",
                "defaulted on debt",
            ),
            "neutral": (
                "held a meeting",
                "relocated offices",
                "appointed a director",
                "scheduled a call",
                "published a report",
                "renamed a unit",
            ),
        },
    },
    "drifted": {
        "zh": {
            "positive": ("飙升", "转危为安", "销量暴增", "营收激增", "派息提升", "市占率攀升"),
            "negative": ("重挫", "爆雷", "遭监管处罚", "商誉减值", "资金链断裂", "濒临破产"),
            "neutral": ("改名", "搬迁总部", "聘请审计机构", "启用徽标", "官网改版", "启动内部培训"),
        },
        "en": {
            "positive": (
                "skyrocketed",
                "rallied sharply",
                "secured regulatory approval",
                "hiked its dividend",
                "returned to profitability",
                "doubled its sales",
            ),
            "negative": (
                "tumbled",
                "went bankrupt",
                "faced a fraud probe",
                "issued a revenue warning",
                "recalled products",
                "crashed",
            ),
            "neutral": (
                "moved its headquarters",
                "hosted an investor day",
                "changed its logo",
                "named an auditor",
                "updated its website",
                "filed routine paperwork",
            ),
        },
    },
}

COMPANIES: dict[Lang, tuple[str, ...]] = {
    "zh": ("华信科技", "东方能源", "长江银行", "宏达汽车", "明远医药", "天成地产", "金桥物流", "新港电子"),
    "en": (
        "Acme Corp",
        "Globex",
        "Initech",
        "Northwind",
        "Contoso",
        "Umbrella Ltd",
        "Vandelay Industries",
        "Hooli",
    ),
}

# News templates per distribution and language; the drifted ones are phrased differently.
TEMPLATES: dict[Distribution, dict[Lang, tuple[str, ...]]] = {
    "original": {
        "zh": ("{company}{time}{cue}。", "{time}{company}{cue}，{filler}。", "{company}{cue}，{filler}。"),
        "en": ("{company} {cue} {time}.", "{Time}, {company} {cue}, {filler}.", "{company} {cue}, {filler}."),
    },
    "drifted": {
        "zh": (
            "据知情人士透露，{company}近期{cue}。",
            "消息显示{company}{cue}，{filler}。",
            "业内传闻：{company}{cue}。",
        ),
        "en": (
            "Sources say {company} {cue} amid {filler}.",
            "In a surprise move, {company} {cue}.",
            "Reports suggest {company} {cue}, with {filler}.",
        ),
    },
}
TIMES: dict[Lang, tuple[str, ...]] = {
    "zh": ("今日", "昨日", "本周", "周一"),
    "en": ("today", "yesterday", "this week", "on Monday"),
}
FILLERS: dict[Distribution, dict[Lang, tuple[str, ...]]] = {
    "original": {
        "zh": ("市场关注度较高", "分析师正在跟踪", "投资者议论纷纷"),
        "en": ("analysts said", "traders noted", "according to a filing"),
    },
    "drifted": {
        "zh": ("引发业内热议", "相关细节仍待确认", "后续走势有待观察"),
        "en": ("heavy trading", "details still emerging", "investors watching closely"),
    },
}


class DemoExample(BaseModel):
    """One demo-task example: the prompt, the R1-style rationale and the expected answer."""

    prompt: str
    reasoning: str
    answer: str
    lang: Lang
    distribution: Distribution


def _news(rng: random.Random, lang: Lang, distribution: Distribution, cue: str) -> str:
    template = rng.choice(TEMPLATES[distribution][lang])
    time = rng.choice(TIMES[lang])
    return template.format(
        company=rng.choice(COMPANIES[lang]),
        cue=cue,
        time=time,
        Time=time[:1].upper() + time[1:],
        filler=rng.choice(FILLERS[distribution][lang]),
    )


def make_example(
    rng: random.Random, lang: Lang, label: Label, distribution: Distribution, cue: str | None = None
) -> DemoExample:
    """Draw one example with the given language and label (and cue, by default one from the vocabulary)."""
    cue = cue or rng.choice(CUE_WORDS[distribution][lang][label])
    return DemoExample(
        prompt=INSTRUCTIONS[lang] + _news(rng, lang, distribution, cue),
        reasoning=REASONING[lang][label].format(cue=cue),
        answer=ANSWERS[lang][label],
        lang=lang,
        distribution=distribution,
    )


def generate_examples(n: int, *, seed: int, distribution: Distribution = "original") -> list[DemoExample]:
    """`n` examples, deterministic for `seed`, with languages and labels balanced to within one block."""
    rng = random.Random(f"{distribution}:{seed}")
    combos = [(lang, label) for lang in LANGS for label in LABELS]
    plan: list[tuple[Lang, Label]] = []
    while len(plan) < n:
        block = combos.copy()
        rng.shuffle(block)
        plan.extend(block)
    return [make_example(rng, lang, label, distribution) for lang, label in plan[:n]]


def golden_set() -> list[DemoExample]:
    """The fixed regression-guard set (original distribution, its own seed)."""
    return generate_examples(GOLDEN_SIZE, seed=GOLDEN_SEED)


_STRIP = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase `text` and drop whitespace and punctuation (ASCII and CJK)."""
    kept = (ch for ch in text if not ch.isspace() and ch not in _STRIP)
    return "".join(ch for ch in kept if not unicodedata.category(ch).startswith("P")).lower()


def is_correct(predicted_answer: str, example: DemoExample) -> bool:
    """Whether a predicted answer matches the example's answer after normalization."""
    return normalize_answer(predicted_answer) == normalize_answer(example.answer)


def extract_answer(completion: str) -> str | None:
    """The answer after `</think>` in an R1 completion; None if the think block is open or nothing follows."""
    if "</think>" not in completion:
        return None
    answer = completion.split("</think>", 1)[1].strip()
    return answer or None
