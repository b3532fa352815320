"""flywheel: serve LoRA-tuned R1-distilled models and keep improving them from user feedback."""

import logging

# GPTQModel imports torchao, which on a CPU-only torch logs a warning per missing CUDA library and
# per enum it registers the old way, in every process (PEFT and transformers import it). Not news.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
