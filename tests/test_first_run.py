"""First-run experience: DeepSpeed's JIT compile of its CPU comm op is announced, and only when not cached; it is
built with one ninja whether or not the venv is activated (so the cache is not rebuilt between the two)."""
import os
import shutil
import sys
from pathlib import Path

from pipeline.train import announce_compile, build_with_this_environments_ninja


def test_compile_is_announced_with_its_cache_only_when_not_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    announce_compile("deepspeed_shm_comm", "the comm op")
    err = capsys.readouterr().err
    assert "compiling the comm op (deepspeed_shm_comm)" in err and str(tmp_path / "deepspeed_shm_comm") in err
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF")
    announce_compile("deepspeed_shm_comm", "the comm op")
    assert capsys.readouterr().err == ""


def test_the_op_is_built_with_the_interpreters_own_ninja(monkeypatch):
    own = Path(sys.executable).parent
    assert (own / "ninja").is_file()  # the ninja wheel is a torch-extension build requirement of the venv
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))  # a shell without the venv activated
    build_with_this_environments_ninja()
    build_with_this_environments_ninja()  # twice: PATH is not extended again
    assert Path(shutil.which("ninja")).parent == own
    assert os.environ["PATH"] == os.pathsep.join([str(own), "/usr/bin", "/bin"])
