"""Merge fine-tuned LLMs into one multi-task model without training, by Hi-Merging."""
__version__ = "0.1.0"
