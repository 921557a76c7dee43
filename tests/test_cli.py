"""The condaproxy command, run as a real process: exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from condaproxy import __version__
from condaproxy.cli import main

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "condaproxy.ini"
GOOD = """\
[lazy]
streamer_interface = 127.0.0.1   ; not "lo": the test must not depend on interface names
[cache]
directory = cache
[channel:conda-forge]
url = https://conda.anaconda.org/conda-forge
"""


def condaproxy(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "condaproxy", *args],
        capture_output=True, text=True, cwd=cwd, timeout=60, check=False,
    )


def assert_one_line_error(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("condaproxy: ")
    for word in words:
        assert word in lines[0]


def test_check_config_good_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.ini"
    path.write_text(GOOD)
    result = condaproxy(tmp_path, "check-config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: ok"
    summary = "\n".join(lines[1:])
    assert "127.0.0.1:8751" in summary
    assert str(tmp_path / "cache") in summary
    assert "conda-forge: https://conda.anaconda.org/conda-forge" in summary
    assert result.stderr == ""


def test_check_config_shipped_example(tmp_path: Path) -> None:
    result = condaproxy(tmp_path, "check-config", str(SHIPPED))
    if result.returncode == 2 and "streamer_interface" in result.stderr:
        pytest.skip("this host has no interface named lo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{SHIPPED}: ok\n")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[lazy]\nstreamer_port = 99999\n", ("[lazy] streamer_port", "1 to 65535")),
        ("[cache]\ncolour = blue\n", ("[cache] colour", "allowed keys")),
        ("[channel:conda-forge]\nread_timeout = 3\n", ("[channel:conda-forge] url", "missing")),
        ("[lazy]\nstreamer_interface = nosuchif0\n", ("[lazy] streamer_interface", "nosuchif0")),
        ("[lazy\n", ("line 1",)),
    ],
)
def test_check_config_bad_file(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    path = tmp_path / "bad.ini"
    path.write_text(text)
    result = condaproxy(tmp_path, "check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_line_error(result.stderr, str(path), *words)


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = condaproxy(tmp_path, "check-config", "absent.ini")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "absent.ini", "cannot read")


def test_serve_with_bad_config_fails_before_serving(tmp_path: Path) -> None:
    path = tmp_path / "bad.ini"
    path.write_text("[upstream]\ndefault = ftp://x.example\n")
    result = condaproxy(tmp_path, "--log-level", "debug", "serve", "--config", str(path))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, str(path), "[upstream] default")


def test_version(tmp_path: Path) -> None:
    result = condaproxy(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"condaproxy {__version__}"


def test_console_script_version(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "condaproxy"
    if not script.exists():
        pytest.skip("the condaproxy console script is not installed beside this python")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"condaproxy {__version__}"


def test_main_returns_status_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "proxy.ini"
    path.write_text(GOOD)
    assert main(["check-config", str(path), "--log-level", "warning"]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ok\n")
    assert main(["--version"]) == 0
    assert main([]) == 2  # a command is required
    assert main(["--log-level", "loud", "check-config", str(path)]) == 2
