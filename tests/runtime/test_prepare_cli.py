"""`secateurs prepare` (what the setup runs): converts the default model and builds the kernels."""

from secateurs import models
from secateurs.cli import main
from secateurs.runtime import build


def test_prepare_builds_kernels(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(models, "materialize_embedded", lambda name: tmp_path / name)
    monkeypatch.setattr(build, "build", lambda: tmp_path / "kernels.so")
    assert main(["dev", "prepare"]) == 0
    assert f"kernels: {tmp_path / 'kernels.so'}" in capsys.readouterr().out


def test_failed_kernel_build_is_an_error_only_in_ci(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(models, "materialize_embedded", lambda name: tmp_path / name)

    def broken():
        raise build.BuildError("no C++ compiler found")

    monkeypatch.setattr(build, "build", broken)
    monkeypatch.setenv("CI", "false")
    assert main(["dev", "prepare"]) == 0
    assert "pure-torch fallback" in capsys.readouterr().err
    monkeypatch.setenv("CI", "true")
    assert main(["dev", "prepare"]) == 2
    assert "no C++ compiler found" in capsys.readouterr().err
