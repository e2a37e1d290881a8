"""Open weights in and out: Hugging Face model directories (import and export) and GGUF files for llama.cpp.

    from ownllm.interop.hf import load_hf, import_hf, export_hf
    run = load_hf("path/to/hf-model")                 # GPT-2, Llama or Qwen2 layout -> run.model, run.tokenizer
    import_hf("path/to/hf-model", "runs/base")         # the same, written as an ownllm run directory
    export_hf("runs/mine", "exported/hf")              # loads with transformers.AutoModelForCausalLM

    from ownllm.interop.gguf import export_gguf
    export_gguf("runs/mine", "exported/mine.gguf", quant="q8_0")   # loads in llama.cpp

`ownllm.load(path)` and every CLI verb that takes a model accept an HF directory directly: it is converted in memory.
"""
