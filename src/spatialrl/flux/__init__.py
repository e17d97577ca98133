"""The FLUX policy: loading, prompt encoding, SDE sampling with log-probs, and LoRA."""
