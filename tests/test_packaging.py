"""The distributions: what a user downloads carries the license, the metadata and runnable tests."""

from __future__ import annotations

import email
import email.message
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_to_end

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The sdist and the wheel built from this checkout (the wheel from the sdist, as pip does)."""
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not run from a source tree")
    out = tmp_path_factory.mktemp("dist")
    result = run_to_end(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield out


def _sdist(dist: Path) -> Path:
    (path,) = dist.glob("procorch-*.tar.gz")
    return path


def _wheel(dist: Path) -> Path:
    (path,) = dist.glob("procorch-*.whl")
    return path


def _wheel_metadata(dist: Path) -> email.message.Message:
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(wheel.read(name))


def test_wheel_and_sdist_carry_the_license(dist: Path) -> None:
    """LICENSE, the MIT text, is in both distributions."""
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith("licenses/LICENSE")]
        assert wheel.read(name).decode() == license_text
    with tarfile.open(_sdist(dist)) as sdist:
        member = sdist.extractfile(f"{_sdist(dist).name.removesuffix('.tar.gz')}/LICENSE")
        assert member is not None and member.read().decode() == license_text


def test_metadata_declares_license_classifiers_and_urls(dist: Path) -> None:
    """The wheel's metadata: an SPDX license expression, classifiers, project URLs."""
    metadata = _wheel_metadata(dist)
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    classifiers = metadata.get_all("Classifier") or []
    for version in ["3.11", "3.12", "3.13"]:  # the suite passes on each
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Typing :: Typed" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # PEP 639: the expression
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL") or [])
    assert {"Homepage", "Source", "Issues", "Changelog", "Documentation"} <= set(urls)


def test_readme_links_are_absolute(dist: Path) -> None:
    """The long description (the README) has no relative link, which a package index breaks."""
    description = _wheel_metadata(dist).get_payload()
    assert isinstance(description, str)
    targets = [part.split(")", 1)[0] for part in description.split("](")[1:]]
    assert targets, "the README links to the design note"
    assert all(target.startswith("https://") for target in targets), targets


def test_sdist_tests_are_collected(dist: Path, tmp_path: Path) -> None:
    """Unpacked, the sdist's test suite is complete: every module is collected, none errors."""
    with tarfile.open(_sdist(dist)) as sdist:
        sdist.extractall(tmp_path, filter="data")
    (tree,) = tmp_path.iterdir()
    for helper in ["conftest.py", "helpers.py", "cli_executors.py"]:
        assert (tree / "tests" / helper).exists(), helper
    result = run_to_end(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    modules = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    expected = {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")}
    assert modules == expected
