"""Filtered GRPO: group advantages, top-k/bottom-k selection and the clipped surrogate."""
