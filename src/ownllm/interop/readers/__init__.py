"""Readers: foreign model files in, as plain data (`foreign.ForeignModel`: config, float32 state dict under ownllm's
names, tokenizer, the run config's source sections). `ownllm.runs` turns one into a loaded model; the `import_*`
functions save one as an ownllm run directory. Readers know no `LoadedRun` and no writer.

`hf` (Hugging Face directories), `gguf` (llama.cpp files) with `gguf_tokenizer` (a GGUF vocabulary as a
`tokenizers` tokenizer), `hub` (`hf:ORG/NAME` through the Hugging Face cache).
"""
