"""`ownllm download` and `hf:ORG/NAME` against a small local HTTP server that answers the Hub endpoints
huggingface_hub calls (revision info, tree listing, file resolve with etag/commit headers and ranges), reached
through HF_ENDPOINT as a mirror would be: the downloaded model gives the source's logits; a missing model and an
offline machine are one line and exit code 2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from interop_helpers import PROMPTS, randomize, small_bpe
from parity import assert_parity

import ownllm
from ownllm.runs import LoadedRun
from ownllm.config import model_config_from_preset
from ownllm.interop.writers.hf import export_hf
from ownllm.model import GPT

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-llama"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(BaseHTTPRequestHandler):
    """GET/HEAD /api/models/ORG/NAME/revision/REV, /api/models/ORG/NAME/tree/REV, /ORG/NAME/resolve/REV/FILE."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_HEAD(self) -> None:
        self.do_GET(body=False)

    def do_GET(self, body: bool = True) -> None:
        path = unquote(urlsplit(self.path).path)
        self.requests.append(f"{self.command} {path}")
        api = f"/api/models/{REPO}/"
        if path.startswith(api + "revision/"):
            return self.send_json({"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": n} for n in self.files]}, body)
        if path.startswith(api + "tree/"):
            return self.send_json([self.tree_entry(name, data) for name, data in self.files.items()], body)
        prefix = f"/{REPO}/resolve/"
        if path.startswith(prefix) and path[len(prefix):].split("/", 1)[-1] in self.files:
            return self.send_file(path[len(prefix):].split("/", 1)[1], body)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound" if REPO not in path else "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    @staticmethod
    def tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
        if name.endswith((".safetensors", ".bin")):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def send_json(self, value, body: bool) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def send_file(self, name: str, body: bool) -> None:
        data = self.files[name]
        lfs = name.endswith((".safetensors", ".bin"))
        start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0] or 0)
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(data[start:])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub")
    tokenizer = small_bpe(folder)
    config = model_config_from_preset("tiny-llama", vocab_size=tokenizer.vocab_size)
    run = LoadedRun(path=folder, model=randomize(GPT(config), seed=3), tokenizer=tokenizer, config=config,
                    run_config={})
    export_hf(run, folder / "repo")
    files = {path.name: path.read_bytes() for path in (folder / "repo").iterdir()}
    files["pytorch_model.bin"] = b"a pickle ownllm must never fetch"
    files["README.md"] = b"# tiny\n"
    return run, files


@pytest.fixture(scope="module")
def hub(source):
    FakeHub.files, FakeHub.requests = source[1], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


# Several CLI invocations in one fresh process (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when imported):
# argv lists in, [(exit code, stderr)] out, as JSON on the last line.
RUN_CLI = """
import contextlib, io, json, sys
from ownllm.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append((code, err.getvalue()))
print(json.dumps(results))
"""


def ownllm_cli(commands: list[list[str]], home: Path, endpoint: str, **env: str) -> list[tuple[int, str]]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE"))}
    environment.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
                       HF_HUB_DISABLE_PROGRESS_BARS="1", **env)
    done = subprocess.run([sys.executable, "-c", RUN_CLI, json.dumps(commands)], capture_output=True, text=True,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    return [tuple(result) for result in json.loads(done.stdout.splitlines()[-1])]


def assert_source_logits(run, source) -> None:
    ids = source.tokenizer.encode(PROMPTS[2])
    assert run.tokenizer.encode(PROMPTS[2]) == ids
    with torch.no_grad():
        assert_parity(run.model(torch.tensor([ids])), source.model(torch.tensor([ids])), layers=run.config.n_layer,
                      what="downloaded vs source")


def assert_one_line_error(result: tuple[int, str], fragment: str) -> None:
    code, err = result
    assert code == 2 and err.startswith("ownllm: error: ") and err.count("\n") == 1 and fragment in err, err


def test_download_and_hf_references_give_the_source_logits(source, hub, tmp_path):
    results = ownllm_cli([["download", REPO, "--out", str(tmp_path / "model")],
                          ["import", f"hf:{REPO}@main", "--out", str(tmp_path / "run")],
                          ["generate", "hf:tiny-org/no-such-model", "--prompt", "x"]], tmp_path / "hf", hub)
    assert results[0][0] == 0 and results[1][0] == 0, results
    names = {path.name for path in (tmp_path / "model").iterdir() if not path.name.startswith(".")}
    assert names == set(source[1]) - {"pytorch_model.bin", "README.md"}  # only what ownllm reads
    assert not any("pytorch_model.bin" in request for request in FakeHub.requests)
    assert any(request.startswith("GET /api/models/") for request in FakeHub.requests)
    assert_source_logits(ownllm.load(str(tmp_path / "model")), source[0])
    # hf:ORG/NAME went through the user's HF cache (HF_HOME)
    assert list((tmp_path / "hf" / "hub").glob("models--tiny-org--tiny-llama/snapshots/*/model.safetensors"))
    assert_source_logits(ownllm.load(str(tmp_path / "run")), source[0])
    assert_one_line_error(results[2], "tiny-org/no-such-model: no such model")


def test_offline_without_the_model_in_the_cache_is_one_line_and_exit_2(hub, tmp_path):
    (result,) = ownllm_cli([["download", REPO]], tmp_path / "hf", hub, HF_HUB_OFFLINE="1")
    assert_one_line_error(result, "cannot be reached (HF_HUB_OFFLINE is set)")


def test_download_into_a_folder_replaces_other_files_only_with_force_and_never_reports_what_it_did_not_do(
        source, hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from ownllm.cli import main

    other = tmp_path / "other"
    export_hf(LoadedRun(path=tmp_path, model=source[0].model, tokenizer=source[0].tokenizer, config=source[0].config,
                        run_config={}), other)  # a model folder of the user's, not a download of REPO
    files = lambda: {path: path.read_bytes() for path in other.rglob("*") if path.is_file()}  # noqa: E731
    before = files()
    (tmp_path / "notes.txt").write_text("mine\n")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network
    for argv, fragment in [(["--out", other], "exists and is not empty; pass --force"),
                           (["--out", tmp_path / "notes.txt", "--force"], "exists and is not a directory"),
                           (["--out", tmp_path / "fresh"], "cannot be reached (HF_HUB_OFFLINE is set)"),
                           # huggingface_hub hands back a folder that holds files when the Hub does not answer:
                           # ownllm said "downloaded" for a download that never happened
                           (["--out", other, "--force"], "cannot be reached (HF_HUB_OFFLINE is set)")]:
        assert main(["download", REPO, *map(str, argv)]) == 2
        assert_one_line_error((2, capsys.readouterr().err), fragment)
    assert files() == before and (tmp_path / "notes.txt").read_text() == "mine\n"
    assert not (tmp_path / "fresh").exists()  # nothing came, no folder left

    results = ownllm_cli([["download", REPO, "--out", str(other), "--force"],
                          ["download", REPO, "--out", str(other)]], tmp_path / "hf", hub)
    assert [code for code, _ in results] == [0, 0], results  # replaced as a whole, then brought up to date in place
    assert sorted(path.name for path in other.iterdir() if not path.name.startswith(".")) == sorted(
        set(source[1]) - {"pytorch_model.bin", "README.md"})
    assert_source_logits(ownllm.load(str(other)), source[0])
    assert main(["download", REPO, "--out", str(other)]) == 2  # offline again: an earlier download is no success
    assert_one_line_error((2, capsys.readouterr().err), f"nothing downloaded into {other}")


@pytest.mark.parametrize("raised", ["LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ProxyError",
                                    "ReadTimeout", "OSError", "XetDownloadError", "RuntimeError", "ValueError"])
@pytest.mark.parametrize("verb", ["download", "import", "generate"])
def test_whatever_huggingface_hub_raises_is_one_line_naming_the_offline_alternatives(raised, verb, monkeypatch,
                                                                                      tmp_path, capsys):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    from ownllm.cli import main

    error = {"LocalEntryNotFoundError": errors.LocalEntryNotFoundError("no cache"),
             "OfflineModeIsEnabled": errors.OfflineModeIsEnabled("offline"),
             "ConnectError": httpx2.ConnectError("[Errno -2] Name or service not known"),
             "ProxyError": httpx2.ProxyError("407 Proxy Authentication Required"),
             "ReadTimeout": httpx2.ReadTimeout("timed out"), "OSError": OSError(28, "No space left on device"),
             "XetDownloadError": errors.XetDownloadError("xet"), "RuntimeError": RuntimeError(),
             "ValueError": ValueError("an internal check\nwith a second line")}[raised]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    argv = {"download": ["download", REPO, "--out", str(tmp_path / "model")],
            "import": ["import", f"hf:{REPO}", "--out", str(tmp_path / "run")],
            "generate": ["generate", f"hf:{REPO}", "--prompt", "x"]}[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ownllm: error: {REPO}: ") and "a .gguf file or a run" in err, err
    assert list(tmp_path.iterdir()) == []
