"""Training: objective, injector, data, base model, stage 0, stage 1, fast finetune."""
