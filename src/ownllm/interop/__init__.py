"""Open weights in and out: Hugging Face model directories (import and export) and GGUF files for llama.cpp.

    from ownllm.interop.hf import import_hf, export_hf
    from ownllm.runs import load_run
    run = load_run("path/to/hf-model")                 # GPT-2, Llama or Qwen2 layout -> run.model, run.tokenizer
    import_hf("path/to/hf-model", "runs/base")         # the same, written as an ownllm run directory
    export_hf(load_run("runs/mine"), "exported/hf")    # loads with transformers.AutoModelForCausalLM

    from ownllm.interop.gguf import export_gguf
    export_gguf(load_run("runs/mine"), "exported/mine.gguf", quant="q8_0")   # loads in llama.cpp

This package reads and writes files; loading (`ownllm.runs.load_run`, `ownllm.load`) calls its readers, so every
CLI verb that takes a model accepts an HF directory directly: it is converted in memory.
"""
