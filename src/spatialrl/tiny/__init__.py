"""Tiny random models of the production classes, saved in from_pretrained format for CPU tests."""
