"""The documents of a folder, as text: what `ownllm index` and `finetune embed --docs` read.

    files = find_documents("notes/")
    texts, unreadable = read_documents("notes/", files)   # {relative path: text}, ["scan.pdf (no text layer)", ...]

Plain text (.txt, .md, .markdown, .rst; UTF-8, a BOM dropped), HTML (.html, .htm: the visible text, scripts and
styles left out, with beautifulsoup4) and PDF (.pdf: each page's text layer, with pypdf). The last two are optional
extras (`pip install ownllm[documents]`). A file that cannot be read — not UTF-8, a damaged or encrypted PDF, a PDF
with no text layer (a scan), a format whose library is not installed — is skipped and listed with the reason,
never fatal: one odd file does not stop a folder from being indexed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ownllm.errors import OwnLLMError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
DOC_SUFFIXES = (*TEXT_SUFFIXES, ".html", ".htm", ".pdf")
EXTRA = "pip install 'ownllm[documents]'"


def find_documents(folder: str | Path, leave_out: Path | None = None) -> list[Path]:
    """The documents under `folder` (not hidden, not `leave_out`: the index itself); none is an OwnLLMError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OwnLLMError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; give the folder of "
                          f"documents to index ({', '.join(DOC_SUFFIXES)} files)")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and (leave_out is None or p.resolve() != leave_out))
    if not found:
        raise OwnLLMError(f"{folder}: no documents to index (no {', '.join(DOC_SUFFIXES)} files, searched "
                          "recursively)")
    return found


def read_document(path: Path) -> str:
    """A document's text; one that cannot be read is an OwnLLMError saying why (see the module docstring)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".pdf":
            return _pdf_text(path)
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise OwnLLMError(f"not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise OwnLLMError(f"cannot read ({error.strerror})") from None
    return _html_text(text) if suffix in (".html", ".htm") else text


def read_documents(folder: str | Path, files: list[Path]) -> tuple[dict[str, str], list[str]]:
    """({path relative to folder: text}, ["path (why it was skipped)", ...])."""
    texts, unreadable = {}, []
    for path in files:
        name = path.relative_to(folder).as_posix()
        try:
            texts[name] = read_document(path)
        except OwnLLMError as error:
            unreadable.append(f"{name} ({error})")
    return texts, unreadable


def _html_text(html: str) -> str:
    try:
        from bs4 import BeautifulSoup
    except ImportError:
        raise OwnLLMError(f"HTML needs beautifulsoup4: {EXTRA}") from None
    soup = BeautifulSoup(html, "html.parser")
    for hidden in soup(["script", "style", "template", "noscript"]):
        hidden.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return "\n".join(line for line in lines if line)


def _pdf_text(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise OwnLLMError(f"PDF needs pypdf: {EXTRA}") from None
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about damaged files: the reason says it
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise OwnLLMError("an encrypted PDF")
        text = "\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError) as error:
        raise OwnLLMError(f"a damaged PDF: {error}") from None
    if not text.strip():
        raise OwnLLMError("a PDF with no text layer (a scan?)")
    return text
