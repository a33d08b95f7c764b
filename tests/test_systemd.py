"""The systemd units: systemd-analyze accepts them silently, they score well, and they say
what the supervisor relies on (notify, mixed kill mode, HUP reload, a stop timeout above
the drain timeout)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workerpool.config import OPTIONS

UNITS = Path(__file__).resolve().parent.parent / "systemd"
# (file in systemd/, the name systemd-analyze is given): a template is checked as an instance.
CASES = [
    ("workerpool.service", "workerpool.service"),
    ("workerpool@.service", "workerpool@emails.service"),
]
MAX_EXPOSURE = 3.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")

DRAIN_TIMEOUT_DEFAULT = next(o.default for o in OPTIONS if o.name == "drain_timeout")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned, in order (keys may repeat in unit files)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span (60, 60s, 1min 30s, 2m) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "ms": 0.001}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def runnable_copy(source: str, name: str, tmp_path: Path) -> Path:
    """The unit copied under `name`, ExecStart pointed at a binary that exists here.

    verify fails (rightly) on a missing executable; /usr/local/bin/workerpool is only there
    once installed, so its path is swapped for this interpreter running the same CLI module.
    """
    text = (UNITS / source).read_text()
    binary = re.search(r"^ExecStart=[-@:+!]*(\S+)", text, re.MULTILINE).group(1)
    if not os.access(binary, os.X_OK):
        text = re.sub(
            r"^(ExecStart=[-@:+!]*)\S+",
            lambda m: f"{m.group(1)}{sys.executable} -m workerpool.cli",
            text,
            flags=re.MULTILINE,
        )
    # A template is copied as a template: systemd-analyze instantiates it from the instance name.
    target = tmp_path / source
    target.write_text(text)
    return tmp_path / name


def analyze(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120, env=env)


@needs_analyze
@pytest.mark.parametrize(("source", "name"), CASES)
def test_systemd_analyze_verify_is_silent(source: str, name: str, tmp_path: Path) -> None:
    unit = runnable_copy(source, name, tmp_path)
    result = analyze("verify", str(unit))
    # verify exits 0 on unknown keys and unparsable values and only prints them: both count.
    assert result.returncode == 0 and result.stderr == "", (
        f"systemd-analyze verify {name}: exit {result.returncode}\n{result.stderr}"
    )


@needs_analyze
def test_verify_reports_mistakes_on_stderr_only(tmp_path: Path) -> None:
    # Why the test above watches stderr: a typo'd key still exits 0 here.
    unit = tmp_path / "typo.service"
    unit.write_text("[Service]\nType=notify\nKilMode=mixed\nExecStart=/bin/true\n")
    result = analyze("verify", str(unit))
    assert "KilMode" in result.stderr


@needs_analyze
@pytest.mark.parametrize(("source", "name"), CASES)
def test_security_exposure_is_low(source: str, name: str, tmp_path: Path) -> None:
    unit = runnable_copy(source, name, tmp_path)
    result = analyze("security", "--offline=yes", "--no-pager", str(unit))
    if result.returncode != 0 and re.search(
        r"unrecognized option|unknown option|invalid option", result.stderr, re.IGNORECASE
    ):
        pytest.skip(f"systemd-analyze security --offline is not supported: {result.stderr}")
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"{name}: exposure {exposure}\n{result.stdout}"


@pytest.mark.parametrize("source", [source for source, _ in CASES])
def test_unit_says_what_the_supervisor_relies_on(source: str) -> None:
    unit = parse_unit((UNITS / source).read_text())
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"  # workers' messages must not count
    assert service["KillMode"] == "mixed"  # TERM to the supervisor alone: it drains the workers
    assert service.get("KillSignal", "SIGTERM") in ("SIGTERM", "TERM", "15")
    reload = service["ExecReload"].split()
    assert reload[0].endswith("/kill") and "-HUP" in reload and "$MAINPID" in reload
    assert seconds(service["TimeoutStopSec"]) > DRAIN_TIMEOUT_DEFAULT
    assert seconds(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a bad config is not mended by restarts
    assert service["User"] and service["User"] != "root"
    assert service["ExecStart"].split()[-2:] == ["start", "--foreground"]
    assert "WantedBy" in unit["Install"]
    # The pidfile lives in the RuntimeDirectory systemd creates for the service user.
    env = dict(item.split("=", 1) for item in unit["Service"]["Environment"])
    runtime_dirs = unit["Service"]["RuntimeDirectory"][-1].split()
    assert any(
        env["WORKERPOOL_PIDFILE"] == f"/run/{directory}/workerpool.pid"
        for directory in runtime_dirs
    )


def test_template_is_per_instance() -> None:
    service = {
        key: values[-1]
        for key, values in parse_unit((UNITS / "workerpool@.service").read_text())[
            "Service"
        ].items()
    }
    assert "--config /etc/workerpool/%i.ini" in service["ExecStart"]
    for key in ("RuntimeDirectory", "StateDirectory", "LogsDirectory"):
        assert service[key] == "workerpool/%i"
    assert service["Environment"] == "WORKERPOOL_PIDFILE=/run/workerpool/%i/workerpool.pid"


def test_parse_unit_and_seconds() -> None:
    unit = parse_unit("[A]\n# c\nX=1\nX=2\nY=a \\\n  b\n")
    assert unit == {"A": {"X": ["1", "2"], "Y": ["a b"]}}
    assert seconds("60") == 60 and seconds("1min 30s") == 90 and seconds("2m") == 120
