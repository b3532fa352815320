"""Training plane: the demo task and base model, LoRA SFT, evaluation and gates."""
