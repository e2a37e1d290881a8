"""Models from the Hugging Face Hub: download the files ownllm reads, into the user's HF cache or a folder.

    download("HuggingFaceTB/SmolLM2-135M-Instruct", out="models/smol")   # ownllm download ORG/NAME --out DIR
    local_model_path("hf:HuggingFaceTB/SmolLM2-135M-Instruct@main")     # what `hf:ORG/NAME` means to every verb

Through `huggingface_hub`, so its conventions hold: files land in the user's cache (`HF_HOME`, `HF_HUB_CACHE`)
unless `out` is given; the user's token (`hf auth login`, `HF_TOKEN`) is sent for gated or private models;
`HF_ENDPOINT` names another Hub (a mirror); an interrupted download resumes where it stopped; `HF_HUB_OFFLINE=1`
uses what is cached. Only the model's config, safetensors weights, tokenizer and generation files are fetched,
never `*.bin` pickles, ONNX, GGUF or other formats a repository may also hold.
"""

from __future__ import annotations

import re
from pathlib import Path

from ownllm.errors import OwnLLMError

HF_PREFIX = "hf:"
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "merges.txt", "chat_template.jinja"]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_reference(path: str | Path) -> bool:
    """True for `hf:ORG/NAME` (optionally `@REVISION`)."""
    return isinstance(path, str) and path.startswith(HF_PREFIX)


def parse_hub_reference(reference: str) -> tuple[str, str | None]:
    """`hf:ORG/NAME@REV` (or `ORG/NAME`) -> (repo id, revision or None)."""
    spec = reference.removeprefix(HF_PREFIX)
    repo_id, _, revision = spec.partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise OwnLLMError(f"{reference!r} is not a Hub model name: write ORG/NAME (hf:ORG/NAME[@REVISION] as a model)")
    return repo_id, revision or None


def download(repo_id: str, revision: str | None = None, out: str | Path | None = None) -> Path:
    """Fetch the model files of `repo_id` at `revision` (default branch) and return the local directory: `out`, or
    the snapshot folder in the HF cache. Network, authentication and missing-model problems are one OwnLLMError."""
    repo_id, parsed_revision = parse_hub_reference(repo_id)
    revision = revision or parsed_revision
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise OwnLLMError("downloading from the Hub needs huggingface_hub: pip install huggingface_hub") from None
    where = f"{repo_id}{'@' + revision if revision else ''}"
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES,
                                   local_dir=str(out) if out is not None else None)
    except hub_errors.GatedRepoError:
        raise OwnLLMError(f"{where}: the model is gated; accept its terms on the Hub and log in "
                          "(`hf auth login` or HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise OwnLLMError(f"{where}: no such model on {constants.ENDPOINT} (or it is private: log in with "
                          "`hf auth login` or set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise OwnLLMError(f"{where}: the model has no revision {revision!r}") from None
    except hub_errors.LocalEntryNotFoundError:
        raise OwnLLMError(f"{where}: the Hub ({constants.ENDPOINT}) cannot be reached"
                          f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''} and the model is not "
                          "in the local cache; connect and retry (the download resumes)") from None
    except (hub_errors.HfHubHTTPError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OwnLLMError(f"{where}: download failed ({reason}); retry to resume it") from None
    return _checked_model_folder(Path(folder), where)


def _checked_model_folder(folder: Path, where: str) -> Path:
    if not (folder / "config.json").is_file():
        raise OwnLLMError(f"{where}: the repository has no config.json; not a transformers model repository")
    if not any(folder.glob("*.safetensors")):
        raise OwnLLMError(f"{where}: the repository has no safetensors weights (ownllm reads no pickled *.bin); "
                          "look for a safetensors or GGUF version of the model")
    return folder


def local_model_path(path: str | Path) -> str | Path:
    """`hf:ORG/NAME[@REV]` -> the downloaded (or cached) directory; any other path unchanged."""
    return download(path) if is_hub_reference(path) else path


__all__ = ["download", "local_model_path", "is_hub_reference", "parse_hub_reference", "MODEL_FILES"]
