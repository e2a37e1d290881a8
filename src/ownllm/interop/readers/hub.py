"""Models from the Hugging Face Hub: download the files ownllm reads, into the user's HF cache or a folder.

    download("HuggingFaceTB/SmolLM2-135M-Instruct", out="models/smol")   # ownllm download ORG/NAME --out DIR
    local_model_path("hf:HuggingFaceTB/SmolLM2-135M-Instruct@main")     # what `hf:ORG/NAME` means to every verb

Through `huggingface_hub`, so its conventions hold: files land in the user's cache (`HF_HOME`, `HF_HUB_CACHE`)
unless `out` is given; the user's token (`hf auth login`, `HF_TOKEN`) is sent for gated or private models;
`HF_ENDPOINT` names another Hub (a mirror); an interrupted download resumes where it stopped; `HF_HUB_OFFLINE=1`
uses what is cached. Only the model's config, safetensors weights, tokenizer and generation files are fetched,
never `*.bin` pickles, ONNX, GGUF or other formats a repository may also hold.

`out` follows `ownllm.outputs`: a file is never replaced; a folder holding other files only with `force`, and then
as a whole (downloaded beside it, renamed at the end); a folder holding an earlier download of the same model is
resumed or brought up to date. Whatever goes wrong (no network, a proxy, a missing model, an error inside
huggingface_hub) is one OwnLLMError, and the Hub not answering is never taken for a finished download; without a
network the message names the offline alternatives (a local directory, a GGUF file, a run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ownllm.errors import OwnLLMError
from ownllm.outputs import check_output, replaced_dir

HF_PREFIX = "hf:"
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "merges.txt", "chat_template.jinja",
               "modules.json", "config_sentence_transformers.json", "1_Pooling/config.json"]  # Sentence Transformers
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
SOURCE_FILE = Path(".cache") / "huggingface" / "ownllm-source.json"  # in `out`: the model downloaded there
OFFLINE = ("without a network, pass a local model instead: a Hugging Face model directory, a .gguf file or a run "
           "(`ownllm download ORG/NAME --out DIR` on a machine with a network makes a folder to copy)")


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


def download(repo_id: str, revision: str | None = None, out: str | Path | None = None, *,
             force: bool = False) -> Path:
    """Fetch the model files of `repo_id` at `revision` (default branch) and return the local directory: `out`, or
    the snapshot folder in the HF cache. Every problem is one OwnLLMError (see the module docstring)."""
    repo_id, parsed_revision = parse_hub_reference(repo_id)
    revision = revision or parsed_revision
    where = f"{repo_id}{'@' + revision if revision else ''}"
    if out is None:
        return _checked_model_folder(_snapshot(repo_id, revision, None, where), where)
    out = Path(out)
    resumable = _downloaded_model(out) == repo_id and not force
    if not resumable:
        check_output(out, "dir", force=force)
    if force and out.is_dir() and any(out.iterdir()):  # replaced as a whole
        with replaced_dir(out) as staging:
            _checked_model_folder(_snapshot(repo_id, revision, staging, where), where)
        return out
    created = not out.exists()
    try:
        return _checked_model_folder(_snapshot(repo_id, revision, out, where), where)
    except OwnLLMError:
        if created and not any(p.is_file() and p != out / SOURCE_FILE for p in out.rglob("*")):
            shutil.rmtree(out)  # nothing came: leave no folder behind
        raise


def _downloaded_model(folder: Path) -> str | None:
    """The model an earlier (perhaps unfinished) download into `folder` was of, or None."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")).get("repo")
    except (OSError, ValueError, AttributeError):
        return None


def _snapshot(repo_id: str, revision: str | None, out: Path | None, where: str) -> Path:
    """snapshot_download into the HF cache or `out` (marked with the model's name first, so that a later run
    resumes it); anything it raises, and an `out` handed back untouched because the Hub was not reached, is one
    OwnLLMError."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise OwnLLMError("downloading from the Hub needs huggingface_hub: pip install huggingface_hub") from None
    if out is not None:
        (out / SOURCE_FILE).parent.mkdir(parents=True, exist_ok=True)
        (out / SOURCE_FILE).write_text(json.dumps({"repo": repo_id}), encoding="utf-8")
    try:
        with _hub_not_reached() as not_reached:
            folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES,
                                                       local_dir=str(out) if out is not None else None)
    except Exception as error:  # whatever huggingface_hub raises: one line
        raise OwnLLMError(_download_error(error, where, revision, constants)) from None
    if not_reached:
        raise OwnLLMError(f"{where}: the Hub ({constants.ENDPOINT}) cannot be reached"
                          f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}: nothing downloaded "
                          f"into {out}; connect and retry (the download resumes), or {OFFLINE}")
    return Path(folder)


@contextlib.contextmanager
def _hub_not_reached() -> Iterator[list[str]]:
    """Collects (and keeps off the terminal) huggingface_hub's notice that it hands back an existing local folder
    because the Hub could not be reached: the list is non-empty when that happened."""
    notices: list[str] = []

    def keep_notice(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Returning existing local_dir"):
            notices.append(record.getMessage())
            return False
        return True

    logger = logging.getLogger("huggingface_hub._snapshot_download")
    logger.addFilter(keep_notice)
    try:
        yield notices
    finally:
        logger.removeFilter(keep_notice)


def _download_error(error: Exception, where: str, revision: str | None, constants) -> str:
    """The one line for an exception from snapshot_download."""
    from huggingface_hub import errors as hub_errors

    if isinstance(error, hub_errors.GatedRepoError):
        return f"{where}: the model is gated; accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)"
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        return (f"{where}: no such model on {constants.ENDPOINT} (or it is private: log in with `hf auth login` or "
                "set HF_TOKEN)")
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return f"{where}: the model has no revision {revision!r}"
    if isinstance(error, hub_errors.LocalEntryNotFoundError):
        return (f"{where}: the Hub ({constants.ENDPOINT}) cannot be reached"
                f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''} and the model is not in the local "
                f"cache; connect and retry (the download resumes), or {OFFLINE}")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"{where}: download failed ({type(error).__name__}{': ' + reason if reason else ''}); retry to resume "
            f"it, or {OFFLINE}")


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
