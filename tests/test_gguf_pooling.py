"""GGUF export with --pooling: `{arch}.pooling_type` holds llama.cpp's number for mean (1) or last (3), weighted-mean
(no llama.cpp equivalent) is refused in one line with nothing written, a GGUF's pooling type becomes the pooling
`ownllm embed` uses when none is given, and, where llama-cpp-python is installed, llama.cpp embeds a text as ownllm
does."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

import ownllm
from embedding_helpers import assert_one_line_error, tiny  # noqa: F401  (tiny is a fixture)
from parity import assert_parity
from ownllm.cli import main
from ownllm.embeddings import default_pooling, embed_texts
from ownllm.errors import OwnLLMError
from ownllm.interop.writers.gguf import export_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The for statement iterates over the items of any sequence.", "def f(x): return x ** 2",
         "Dictionaries map keys to values."]
LLAMA_CPP_POOLING_TYPES = {"mean": 1, "last": 3}  # llama.cpp's enum llama_pooling_type


@pytest.fixture(scope="module")
def loaded(tiny):  # noqa: F811
    return ownllm.load(tiny)


def pooling_type(path) -> int | None:
    field = gguf.GGUFReader(path).fields.get("llama.pooling_type")  # the tiny run is Llama-flavoured
    return None if field is None else field.contents()


@pytest.mark.parametrize("pooling", ["mean", "last", None])
def test_export_writes_the_pooling_type_llama_cpp_reads(pooling, tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "model.gguf"
    flags = ["--pooling", pooling] if pooling else []
    assert main(["export", str(tiny), "--to", "gguf", "--out", str(out), "--quant", "f32", *flags]) == 0
    assert pooling_type(out) == LLAMA_CPP_POOLING_TYPES.get(pooling)


@pytest.mark.parametrize("flags,named", [(["--to", "gguf", "--pooling", "weighted-mean"], "--pooling weighted-mean"),
                                         (["--to", "gguf", "--pooling", "cls"], "--pooling must be one of mean, last"),
                                         (["--to", "hf", "--pooling", "mean"], "--pooling applies to --to gguf")])
def test_a_pooling_the_export_cannot_hold_is_refused_in_one_line(flags, named, tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out.gguf"
    capsys.readouterr()
    assert_one_line_error(main(["export", str(tiny), "--out", str(out), *flags]), capsys.readouterr().err, named)
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_weighted_mean_before_writing(loaded, tmp_path):
    with pytest.raises(OwnLLMError, match="weighted-mean has no llama.cpp equivalent"):
        export_gguf(loaded, tmp_path / "model.gguf", pooling="weighted-mean")
    assert list(tmp_path.iterdir()) == []


def embed_cli(model, texts_file, out, capsys) -> tuple[np.ndarray, str]:
    capsys.readouterr()
    assert main(["embed", str(model), "--input", str(texts_file), "--output", str(out), "--device", "cpu"]) == 0
    vectors = np.array([json.loads(line)["embedding"] for line in out.read_text().splitlines()])
    return vectors, capsys.readouterr().err


def test_a_gguf_pooling_type_is_the_pooling_embed_uses_by_default(loaded, tmp_path, capsys):
    path = export_gguf(loaded, tmp_path / "last.gguf", quant="f32", pooling="last")
    assert main(["import", str(path), "--out", str(tmp_path / "run")]) == 0
    imported = ownllm.load(tmp_path / "run")
    assert imported.run_config["embedding_pooling"] == "last"
    assert pooling_type(export_gguf(imported, tmp_path / "again.gguf", quant="f32")) == 3  # a re-export keeps it
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    last = embed_texts(loaded, TEXTS, pooling="last").vectors.numpy()
    mean = embed_texts(loaded, TEXTS, pooling="mean").vectors.numpy()
    assert not np.allclose(last, mean, atol=1e-2)  # the two poolings are told apart
    for model in (path, tmp_path / "run"):  # the file itself, and the run imported from it
        vectors, err = embed_cli(model, texts_file, tmp_path / f"vectors-{model.name}.jsonl", capsys)
        assert "(last pooling)" in err
        assert_parity(vectors, last, layers=loaded.config.n_layer, what=f"embed {model.name} vs embed_texts")
    assert default_pooling(loaded) == "mean"  # a run without the key keeps the mean default
    vectors, err = embed_cli(loaded.path, texts_file, tmp_path / "vectors-mean.jsonl", capsys)
    assert "(mean pooling)" in err
    assert_parity(vectors, mean, layers=loaded.config.n_layer, what="embed run vs embed_texts")


# ---- llama.cpp itself, where llama-cpp-python is installed (building it takes minutes: an optional extra) ---------

@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_llama_cpp_embeds_a_text_as_ownllm_does(pooling, loaded, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(loaded, tmp_path / "model.gguf", quant="f32", pooling=pooling)
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                          n_threads=2, verbose=False)  # pooling_type left unset: llama.cpp reads it from the file
    for text in TEXTS:
        theirs = np.array(llm.embed(text, normalize=True), dtype=np.float64)
        ours = embed_texts(loaded, [text], pooling=pooling).vectors[0].numpy().astype(np.float64)
        assert float(theirs @ ours / np.linalg.norm(theirs)) > 0.999, text
