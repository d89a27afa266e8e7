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
