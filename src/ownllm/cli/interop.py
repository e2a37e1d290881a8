"""The verbs that move models in and out: import, download and export (ownllm.interop), each a thin call into the API.

    ownllm import path/to/hf-model --out runs/base          # or pass the HF directory to any verb directly
    ownllm import model.gguf --out runs/base                # a llama.cpp GGUF file, dequantized to float32
    ownllm download ORG/NAME --out models/name              # from the Hugging Face Hub; hf:ORG/NAME works as a model
    ownllm export runs/my-model --to hf --out exported/hf   # or --to gguf --out m.gguf --quant q8_0
"""

from __future__ import annotations

import argparse

from ownllm.cli.common import MODEL_HELP, add_force_flag, add_out_flag
from ownllm.errors import OwnLLMError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import", help="convert a Hugging Face model directory or a GGUF file (GPT-2, Llama, "
                                        "Qwen2) into a run")
    imp.add_argument("source", help="HF directory (config.json, *.safetensors, tokenizer files), a .gguf file, "
                                    "or hf:ORG/NAME[@REVISION]")
    add_out_flag(imp, "new run directory")
    add_force_flag(imp)

    down = sub.add_parser("download", help="fetch a model's config, safetensors and tokenizer from the Hugging Face "
                                           "Hub (resumable; your HF cache and token)")
    down.add_argument("repo", metavar="ORG/NAME", help="model repository, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    down.add_argument("--revision", default=None, help="branch, tag or commit (default: the main branch)")
    add_out_flag(down, "directory for the files (default: the HF cache)", default=None)
    add_force_flag(down, "replace an --out folder holding other files (an earlier download of the model resumes)")

    exp = sub.add_parser("export", help="write a model as a Hugging Face directory or a GGUF file for llama.cpp")
    exp.add_argument("model", help=MODEL_HELP)
    exp.add_argument("--to", choices=["hf", "gguf"], required=True)
    add_out_flag(exp, "directory (hf) or .gguf file (gguf)")
    exp.add_argument("--quant", choices=["f32", "f16", "q8_0", "q4_0"], default="f16",
                     help="GGUF weight type (default f16; 1-D tensors stay f32)")
    exp.add_argument("--pooling", metavar="{mean,last}", default=None,
                     help="GGUF only: write {arch}.pooling_type so llama.cpp's embeddings pool as `ownllm embed "
                          "--pooling` does (weighted-mean has no llama.cpp equivalent; default: no pooling key)")
    add_force_flag(exp)


def cmd_import(args: argparse.Namespace) -> None:
    from ownllm.interop.readers.gguf import import_gguf, is_gguf_path
    from ownllm.interop.readers.hf import import_hf
    from ownllm.interop.readers.hub import local_model_path

    source = local_model_path(args.source)
    if is_gguf_path(source):
        out = import_gguf(source, args.out, force=args.force)
    else:
        out = import_hf(source, args.out, force=args.force)
    print(f"imported {args.source} into {out}")


def cmd_download(args: argparse.Namespace) -> None:
    from ownllm.interop.readers.hub import download

    print(f"downloaded {args.repo} to {download(args.repo, revision=args.revision, out=args.out, force=args.force)}")


def cmd_export(args: argparse.Namespace) -> None:
    from ownllm.runs import load_run

    if args.to == "hf":
        from ownllm.interop.writers.hf import export_hf

        if args.pooling is not None:
            raise OwnLLMError("--pooling applies to --to gguf only (a Hugging Face directory records no pooling)")
        out = export_hf(load_run(args.model, quantize="none"), args.out, force=args.force)
    else:
        from ownllm.interop.writers.gguf import check_gguf_pooling, export_gguf

        check_gguf_pooling(args.pooling)  # before the model loads
        out = export_gguf(load_run(args.model, quantize="none"), args.out, quant=args.quant, force=args.force,
                          pooling=args.pooling)
    print(f"exported {args.model} to {out} ({args.to}{'' if args.to == 'hf' else ', ' + args.quant})")


COMMANDS = {"import": cmd_import, "download": cmd_download, "export": cmd_export}
