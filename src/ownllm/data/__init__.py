"""Data pipelines: raw text for pretraining (`text`), later labelled texts and instruction records."""
