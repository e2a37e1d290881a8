"""Writers: a loaded run (`ownllm.runs.LoadedRun`) out to a foreign format. `hf` writes a Hugging Face directory
that transformers loads, `gguf` one GGUF file for llama.cpp (building on `hf`'s flavour check and weights).
Writers read no foreign file.
"""
