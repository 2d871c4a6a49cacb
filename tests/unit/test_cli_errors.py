"""Bad input: exit code 2, one line on stderr, no traceback, no partial output folder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.cli import assert_user_error, run_cli


def write_gguf(path, architecture: str, with_tensor: bool):
    gguf = pytest.importorskip("gguf", reason="writing GGUF test files needs the gguf package ([export] extra)")
    writer = gguf.GGUFWriter(str(path), architecture)
    if with_tensor:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "no such file or folder")
    assert not (tmp_path / "out").exists()


def test_file_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "a" / "out"))
    assert_user_error(code, err, "is not a model")
    assert not (tmp_path / "a").exists()


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "export", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "no config.json")


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_truncated_onnx(capsys, tiny_exports, tmp_path, command):
    _, folder = tiny_exports["llama"]
    data = (folder / "model.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) // 2])
    argv = [command, str(tmp_path / "model.onnx")] + (["hi"] if command == "generate" else [])
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, "model.onnx")


def test_truncated_external_data(capsys, tiny_exports, tmp_path):
    import shutil

    _, folder = tiny_exports["llama"]
    shutil.copytree(folder, tmp_path / "copy")
    data = tmp_path / "copy" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "copy"))
    assert_user_error(code, err, "truncated")


def test_unsupported_architecture(capsys, tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, _, err = run_cli(capsys, "export", str(folder), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "unsupported architecture 'GPT2LMHeadModel'")
    assert "Llama" in err and "Qwen3" in err and "Mistral" in err
    assert not (tmp_path / "out").exists()


def test_gguf_with_no_tensors(capsys, tmp_path):
    path = write_gguf(tmp_path / "empty.gguf", "llama", with_tensor=False)
    code, _, err = run_cli(capsys, "export", str(path), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "no tensors")
    assert not (tmp_path / "out").exists()


def test_gguf_with_unsupported_architecture(capsys, tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", with_tensor=True)
    code, _, err = run_cli(capsys, "export", str(path), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "unsupported GGUF architecture 'gpt2'")


def test_corrupt_gguf(capsys, tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    code, _, err = run_cli(capsys, "export", str(tmp_path / "bad.gguf"), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "not a valid GGUF file")


def test_non_empty_output_folder_is_kept(capsys, tiny_exports, tmp_path):
    hf, _ = tiny_exports["llama"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", str(hf), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "not empty")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_failure_midway_leaves_nothing(capsys, tiny_exports, tmp_path):
    """A checkpoint missing one tensor fails during graph building; no folder, no staging left."""
    import shutil

    hf, _ = tiny_exports["qwen2"]
    broken = tmp_path / "broken"
    shutil.copytree(hf, broken)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    code, _, err = run_cli(capsys, "export", str(broken), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "model.layers.1.mlp.down_proj.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_exit_code_through_the_console_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "accullm_export.cli.main", "inspect", str(tmp_path / "x.onnx")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_every_help_works():
    for argv in (["--help"], ["export", "--help"], ["generate", "--help"], ["inspect", "--help"],
                 ["validate", "--help"]):
        result = subprocess.run([sys.executable, "-m", "accullm_export.cli.main", *argv],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout


def test_import_and_help_need_only_the_core():
    """With torch, transformers, gguf, safetensors and onnxruntime_genai unimportable, import and --help work."""
    blocked = ["torch", "transformers", "gguf", "safetensors", "accelerate", "onnxruntime_genai", "tensorrt"]
    code = (f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
            "import accullm_export\nfrom accullm_export.cli.main import main\n"
            "for argv in (['--help'], ['export', '--help'], ['generate', '--help'], ['inspect', '--help'],\n"
            "             ['validate', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0, argv\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_missing_optional_dependency_is_a_backend_error(tmp_path):
    """A GGUF export without the [export] extra says how to install it (BackendError, exit 3)."""
    code = ("import sys\nsys.modules['gguf'] = None\nfrom accullm_export.cli.main import main\n"
            f"sys.exit(main(['export', {str(tmp_path / 'm.gguf')!r}, '-o', {str(tmp_path / 'o')!r}]))\n")
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 32)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 3
    assert "pip install 'accullm-export[export]'" in result.stderr and "Traceback" not in result.stderr
