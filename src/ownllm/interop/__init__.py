"""Open weights in and out, by direction: Hugging Face model directories and GGUF files for llama.cpp.

    from ownllm.interop.readers.hf import import_hf
    from ownllm.interop.writers.hf import export_hf
    from ownllm.runs import load_run
    run = load_run("path/to/hf-model")                 # GPT-2, Llama or Qwen2 layout -> run.model, run.tokenizer
    import_hf("path/to/hf-model", "runs/base")         # the same, written as an ownllm run directory
    export_hf(load_run("runs/mine"), "exported/hf")    # loads with transformers.AutoModelForCausalLM

    from ownllm.interop.writers.gguf import export_gguf
    export_gguf(load_run("runs/mine"), "exported/mine.gguf", quant="q8_0")   # loads in llama.cpp

`readers/` (hf, gguf, gguf_tokenizer, hub) turn foreign files into plain data (`readers.foreign.ForeignModel`),
which loading (`ownllm.runs.load_run`, `ownllm.load`) turns into a model, so every CLI verb that takes a model
accepts an HF directory or a GGUF file directly. `writers/` (hf, gguf) write a loaded run out; only they know
`LoadedRun`. `names` holds what both directions share (tensor names, llama.cpp's RoPE row order, pooling types).
Readers and writers never import each other.
"""
