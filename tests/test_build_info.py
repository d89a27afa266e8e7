import pytest

from psa import _loader


def test_build_info_is_recorded_and_matches():
    info = _loader.read_build_info()
    assert {"torch", "cuda", "cuda_archs"} <= set(info)
    _loader.check_build_info(info)


def test_mismatch_names_both_versions():
    with pytest.raises(ImportError, match=r"built for torch 2\.0\.0 but torch 2\.14\.1\+cu130 is running"):
        _loader.check_build_info({"torch": "2.0.0", "cuda": None}, torch_version="2.14.1+cu130")
    with pytest.raises(ImportError, match=r"built for CUDA 12\.1 but torch runs CUDA 13\.0"):
        _loader.check_build_info({"torch": "2.14.1", "cuda": "12.1"}, torch_version="2.14.1", cuda_version="13.0")


def test_missing_build_says_how_to_build(tmp_path):
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        _loader.read_build_info(str(tmp_path / "missing.json"))


def test_env_report_names_versions_and_backends():
    from psa import env
    text = env.report()
    assert "psa: 0.1.0" in text and "torch:" in text and "ops on CPU tensors" in text
    assert "compiled CUDA archs" in text


def test_env_kernel_family_follows_the_dispatch_rules(monkeypatch):
    from psa import env
    built = {"sm90_kernels": True}
    monkeypatch.delenv("PSA_CUDA_KERNEL", raising=False)
    assert env._kernel_family(built, (9, 0))[0] == "sm90"
    assert env._kernel_family(built, (8, 0)) == ("sm80", "the GPU is sm_80, not sm_90 (H100/H200)")
    assert env._kernel_family({"sm90_kernels": False}, (9, 0))[0] == "sm80"
    monkeypatch.setenv("PSA_CUDA_KERNEL", "sm80")
    assert env._kernel_family(built, (9, 0)) == ("sm80", "PSA_CUDA_KERNEL=sm80")
    monkeypatch.setenv("PSA_CUDA_KERNEL", "sm90")
    assert env._kernel_family(built, (8, 0))[0] == "error"
    monkeypatch.setenv("PSA_CUDA_KERNEL", "wgmma")
    assert env._kernel_family(built, (9, 0))[0] == "error"
