"""flywheel: serve LoRA-tuned R1-distilled models and keep improving them from user feedback."""
