"""PDF and HTML documents in an indexed folder (pypdf, beautifulsoup4), and files that cannot be read: listed with
the reason and skipped, never fatal."""

from __future__ import annotations

from pathlib import Path

from embedding_helpers import tiny  # noqa: F401  (a fixture)


def pdf_with_text(lines: list[str]) -> bytes:
    """A one-page PDF (PDF 1.4, Helvetica) whose text layer holds `lines`, written by hand with a correct xref."""
    text = " ".join(f"({line}) Tj 0 -16 Td" for line in lines)
    stream = f"BT /F1 12 Tf 72 720 Td {text} ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def write_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "lease.pdf").write_bytes(pdf_with_text(["The flat lease ends on 30 June 2028.",
                                                      "The landlord is Mr Ferreira."]))
    (folder / "recipe.html").write_text(
        "<html><head><title>Soup</title><style>p {color: red}</style><script>var secret = 'hidden';</script></head>"
        "<body><h1>Pumpkin soup</h1><p>Roast the pumpkin for 45 minutes.</p></body></html>", encoding="utf-8")
    (folder / "note.txt").write_text("Water the ferns on Sundays.", encoding="utf-8")
    (folder / "old.txt").write_bytes("Caf\xe9 on the corner".encode("latin-1"))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    return folder


def test_pdf_and_html_are_read_and_unreadable_files_are_listed(tmp_path):
    from ownllm.documents import find_documents, read_document, read_documents

    folder = write_folder(tmp_path / "docs")
    assert "The flat lease ends on 30 June 2028." in read_document(folder / "lease.pdf")
    html = read_document(folder / "recipe.html")
    assert "Pumpkin soup" in html and "Roast the pumpkin for 45 minutes." in html
    assert "secret" not in html and "color" not in html
    texts, unreadable = read_documents(folder, find_documents(folder))
    assert sorted(texts) == ["lease.pdf", "note.txt", "recipe.html"]
    assert unreadable[0].startswith("broken.pdf (a damaged PDF")
    assert unreadable[1] == "old.txt (not UTF-8 text (byte 3))"


def test_index_reads_a_pdf_and_html_and_skips_what_it_cannot_read(tiny, tmp_path, capsys):  # noqa: F811
    import ownllm
    from ownllm.cli import main
    from ownllm.retrieval import open_index, search

    folder = write_folder(tmp_path / "docs")
    index = tmp_path / "docs.index"
    assert main(["index", str(folder), "--model", str(tiny), "--out", str(index)]) == 0
    summary = capsys.readouterr().out
    assert "embedded 3 chunks of 3 new or changed files" in summary
    assert "skipped 2 unreadable files: broken.pdf (a damaged PDF" in summary and "old.txt (not UTF-8" in summary
    hits = search(open_index(index), ownllm.load(tiny), "When does the flat lease end?", k=1)
    assert hits[0].chunk.path == "lease.pdf" and "30 June 2028" in hits[0].chunk.text
