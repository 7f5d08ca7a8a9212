"""Baking a persona into LoRA weights: sample the steered model, then distil it into an unsteered
student with a LoRA adapter (KL between their next-token distributions on the answers)."""
