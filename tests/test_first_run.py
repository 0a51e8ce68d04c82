"""First-run experience: DeepSpeed's JIT compile of its CPU comm op is announced, and only when not cached."""
from pipeline.train import announce_compile


def test_compile_is_announced_with_its_cache_only_when_not_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    announce_compile("deepspeed_shm_comm", "the comm op")
    err = capsys.readouterr().err
    assert "compiling the comm op (deepspeed_shm_comm)" in err and str(tmp_path / "deepspeed_shm_comm") in err
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF")
    announce_compile("deepspeed_shm_comm", "the comm op")
    assert capsys.readouterr().err == ""
