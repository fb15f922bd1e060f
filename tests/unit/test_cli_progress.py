"""The CLI's progress renderer, NO_COLOR, and the pure parts of pull/search/compat/status."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee_client.cli import output
from rbee_client.cli.main import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, build_parser
from rbee_client.cli.progress import (
    BarDisplay,
    ByteCount,
    LineDisplay,
    ProgressDisplay,
    format_eta,
    progress_display,
    transfer_line,
)
from rbee_client.cli.pull import (
    PullFollower,
    RemoteCompatibility,
    best_verdict,
    is_remote_source,
    pull_summary,
    verification_text,
)
from rbee_client.cli.status import ServiceStatus, status_exit_code
from services.catalog.domain import (
    CompatibilityResult,
    Device,
    DeviceKind,
    Model,
    ModelFormat,
    ModelMetadata,
    ModelSource,
    ModelState,
    ModelType,
    SourceKind,
    Verdict,
)

pytestmark = pytest.mark.unit

ANY_ESCAPE = re.compile(r"\x1b")
SGR = re.compile(r"\x1b\[[0-9;]*m")  # colour and style (not cursor movement)
MiB = 1024 * 1024


def terminal(buffer: io.StringIO) -> Console:
    return output.make_console(buffer, width=120, force_terminal=True)  # type: ignore[arg-type]


def test_line_display_throttles_transfers_but_not_notes_or_new_files() -> None:
    buffer = io.StringIO()
    display = LineDisplay(output.make_console(buffer), interval=3600)  # type: ignore[arg-type]
    display.note("resolving")
    display.transfer("a", "downloading a (1/2)", ByteCount(1 * MiB, 4 * MiB, MiB, 3.0))
    display.transfer("a", "downloading a (1/2)", ByteCount(2 * MiB, 4 * MiB, MiB, 2.0))
    display.complete("a")
    display.transfer("a", "downloading a (1/2)", ByteCount(4 * MiB, 4 * MiB))
    display.transfer("b", "downloading b (2/2)", ByteCount(0, None))
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "resolving",
        "downloading a (1/2) 1.00 MiB/4.00 MiB 1.00 MiB/s eta 3s",
        "downloading b (2/2) 0 B/?",
    ]
    assert not ANY_ESCAPE.search(buffer.getvalue())


def test_transfer_line_and_eta_formats() -> None:
    counts = ByteCount(3 * MiB, 10 * MiB, 2 * MiB, 125.0, reused=MiB)
    assert (
        transfer_line("x", counts) == "x 3.00 MiB/10.00 MiB 2.00 MiB/s eta 2m05s (1.00 MiB reused)"
    )
    assert format_eta(None) == "?"
    assert format_eta(7322) == "2h02m"


def test_bars_show_bytes_rate_and_eta_and_a_spinner_when_the_total_is_unknown() -> None:
    buffer = io.StringIO()
    display = BarDisplay(terminal(buffer))
    display.transfer("a.gguf", "a.gguf (1/2)", ByteCount(3 * MiB, 12 * MiB, 2 * MiB, 4.5))
    display.transfer("b.gguf", "b.gguf (2/2)", ByteCount(5 * MiB, None, MiB))
    known, unknown = display.progress.tasks
    assert known.total == 12 * MiB and known.completed == 3 * MiB
    assert unknown.total is None
    columns = display.progress.columns
    rendered = [str(column(known)) for column in columns]  # type: ignore[operator]
    assert rendered[0].strip() == ""  # no spinner where a bar can say it
    assert "3.00 MiB/12.00 MiB" in rendered and "2.00 MiB/s" in rendered
    assert "eta 4s" in rendered
    spinner = str(columns[0](unknown))  # type: ignore[operator]
    assert spinner.strip() != ""  # a spinner frame
    assert "5.00 MiB" in [str(column(unknown)) for column in columns]  # type: ignore[operator]
    display.complete("a.gguf")
    assert display.progress.tasks[0].finished
    display.close()
    display.close()  # idempotent
    assert "a.gguf (1/2)" in buffer.getvalue()


def test_the_display_follows_the_format_and_the_terminal() -> None:
    assert type(progress_display("json")) is ProgressDisplay
    pipe = output.make_console(io.StringIO())  # type: ignore[arg-type]
    assert isinstance(progress_display("human", console=pipe), LineDisplay)
    bars = progress_display("human", console=terminal(io.StringIO()))
    assert isinstance(bars, BarDisplay)
    bars.close()


def test_no_color_means_no_escapes_even_on_a_forced_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats stdout/stderr as terminals
    monkeypatch.delenv("NO_COLOR", raising=False)
    output.print_table(("A", "B"), [("x", "y")], title="t")
    output.print_fields({"bold key": "v"})
    assert SGR.search(capsys.readouterr().out), "the forced terminal should be styled"

    monkeypatch.setenv("NO_COLOR", "1")
    output.print_table(("A", "B"), [("x", "y")], title="t")
    output.print_fields({"bold key": "v"})
    output.stderr_console().print("[bold red]error[/bold red]: x")
    captured = capsys.readouterr()
    assert "bold key" in captured.out and "error: x" in captured.err
    assert not ANY_ESCAPE.search(captured.out)
    assert not ANY_ESCAPE.search(captured.err)

    buffer = io.StringIO()
    display = BarDisplay(terminal(buffer))
    display.note("resolving")
    display.transfer("a", "a", ByteCount(MiB, 2 * MiB, MiB, 1.0))
    display.close()
    assert "resolving" in buffer.getvalue()
    assert not SGR.search(buffer.getvalue())  # the live display moves the cursor, no colour


def test_no_color_empty_value_does_not_count() -> None:
    assert output.color_allowed({"NO_COLOR": ""})
    assert not output.color_allowed({"NO_COLOR": "1"})


def _update(**fields: object) -> object:
    from rbee_client.provisioner import PullUpdate

    values: dict[str, object] = {
        "pull": "pulls/p1",
        "state": "downloading",
        "file": "a.gguf",
        "file_index": 1,
        "file_count": 1,
        "file_done": 0,
        "file_total": 4 * MiB,
        "done_bytes": 0,
        "total_bytes": 4 * MiB,
        "bytes_per_second": 0.0,
        "eta_seconds": None,
        "reused_bytes": 0,
        "message": "",
        "raw": pb.PullProgress(),
    }
    values.update(fields)
    return PullUpdate(**values)  # type: ignore[arg-type]


def _model(sha: str = "ab" * 32) -> Model:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return Model(
        id="m1",
        source=ModelSource(kind=SourceKind.HUGGINGFACE),
        state=ModelState.READY,
        size_bytes=4 * MiB,
        sha256=sha,
        created_at=now,
        updated_at=now,
    )


def test_pull_follower_notes_stages_and_draws_the_file_then_sums_up() -> None:
    buffer = io.StringIO()
    follower = PullFollower(LineDisplay(output.make_console(buffer)), as_json=False)  # type: ignore[arg-type]
    follower.show(_update(state="resolving", file="", message="chose a.gguf"))
    follower.show(_update(file_done=MiB, done_bytes=MiB, bytes_per_second=float(MiB)))
    follower.show(_update(state="verifying", file="", done_bytes=4 * MiB, reused_bytes=MiB))
    follower.show(_model())
    assert buffer.getvalue().splitlines() == [
        "resolving: chose a.gguf",
        "downloading a.gguf (1/1) 1.00 MiB/4.00 MiB 1.00 MiB/s eta 3s",
        "verifying",
    ]
    assert follower.pull == "pulls/p1" and follower.model is not None
    pull = pb.Pull(files=[pb.PullFile(path="a.gguf", sha256="c" * 64, expected_sha256="c" * 64)])
    pull.total_bytes.total_bytes = 4 * MiB
    pull.total_bytes.reused_bytes = MiB
    line = pull_summary(follower.model, pull, follower, 1.5)
    assert line == (
        "pulled models/m1: 1 file, 4.00 MiB (1.00 MiB reused) in 1.5s at 2.00 MiB/s, "
        "sha256 verified"
    )


class RecordingDisplay(ProgressDisplay):
    """What the follower asked of its display, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def note(self, text: str) -> None:
        self.calls.append(("note", text, 0))

    def transfer(self, key: str, label: str, counts: ByteCount) -> None:
        self.calls.append(("transfer", key, counts.done))

    def complete(self, key: str) -> None:
        self.calls.append(("complete", key, 0))


def test_pull_follower_keeps_files_that_transfer_at_once_apart() -> None:
    display = RecordingDisplay()
    follower = PullFollower(display, as_json=False)
    two = {"file_count": 2, "file_total": 4 * MiB}
    follower.show(_update(file="a", file_index=1, file_done=MiB, **two))
    follower.show(_update(file="b", file_index=2, file_done=MiB, **two))
    follower.show(_update(file="a", file_index=1, file_done=2 * MiB, **two))
    follower.show(_update(file="b", file_index=2, file_done=4 * MiB, **two))
    follower.show(_update(file="a", file_index=1, file_done=3 * MiB, **two))
    assert display.calls == [
        ("transfer", "a", MiB),
        ("transfer", "b", MiB),
        ("transfer", "a", 2 * MiB),  # "a" goes on: b's events do not end it
        ("transfer", "b", 4 * MiB),
        ("complete", "b", 0),  # "b" ends when its bytes do
        ("transfer", "a", 3 * MiB),
    ]
    follower.show(_update(state="verifying", file="", **two))
    assert display.calls[-2:] == [("complete", "a", 0), ("complete", "b", 0)]


def test_line_display_throttles_each_file_of_interleaved_transfers() -> None:
    buffer = io.StringIO()
    display = LineDisplay(output.make_console(buffer), interval=3600)  # type: ignore[arg-type]
    for done in (1, 2, 3):
        display.transfer("a", "a (1/2)", ByteCount(done * MiB, 4 * MiB))
        display.transfer("b", "b (2/2)", ByteCount(done * MiB, 4 * MiB))
    assert buffer.getvalue().splitlines() == [
        "a (1/2) 1.00 MiB/4.00 MiB",
        "b (2/2) 1.00 MiB/4.00 MiB",
    ]


def test_verification_text_says_what_was_checked() -> None:
    unverified = pb.Pull(files=[pb.PullFile(path="a", sha256="c" * 64)])
    assert verification_text(unverified, _model()).startswith("sha256 computed")
    wrong = pb.Pull(files=[pb.PullFile(path="a", sha256="c" * 64, expected_sha256="d" * 64)])
    assert verification_text(wrong, _model()) != "sha256 verified"
    assert verification_text(None, _model("")) == "no sha256"


@pytest.mark.parametrize(
    ("text", "remote"),
    [
        ("hf:org/repo:file.gguf", True),
        ("org/repo", True),
        ("org/repo:x.gguf", True),
        ("civitai:123", True),
        ("https://example.com/x.gguf", True),
        ("tiny", False),
        ("models/tiny", False),
    ],
)
def test_remote_sources_are_told_from_catalog_ids(text: str, remote: bool) -> None:
    assert is_remote_source(text) is remote


def _report(*verdicts: tuple[str, Verdict]) -> RemoteCompatibility:
    results = [CompatibilityResult(worker_type=w, verdict=v) for w, v in verdicts]
    return RemoteCompatibility(
        source="hf:o/r",
        metadata=ModelMetadata(format=ModelFormat.GGUF, model_type=ModelType.LLM),
        devices=[(Device(kind=DeviceKind.CPU, name="cpu"), results)],
        bytes_read=10,
        files=[],
    )


def test_best_verdict_badges() -> None:
    runs = _report(("cuda-llm", Verdict.UNSUPPORTED_DEVICE), ("cpu-llm", Verdict.CPU_ONLY))
    assert best_verdict(runs)[0] == "runs: cpu-llm on cpu (cpu_only)"
    big = _report(("cpu-llm", Verdict.TOO_LARGE), ("cpu-sd", Verdict.UNSUPPORTED_MODEL_TYPE))
    assert best_verdict(big)[0] == "too large: cpu-llm on cpu"
    none = _report(("cpu-llm", Verdict.UNSUPPORTED_ARCH))
    assert best_verdict(none)[0] == "no worker type (unsupported_arch)"
    assert best_verdict(_report())[0] == "no worker type"


def test_status_exit_codes() -> None:
    up = ServiceStatus("catalog", "a", "serving")
    assert status_exit_code([up]) == EXIT_OK
    record = ServiceStatus("workers/w", "-", "stopped", note="not running (pool record)")
    assert status_exit_code([up, record]) == EXIT_OK
    assert status_exit_code([up, ServiceStatus("pool", "b", "not_serving")]) == EXIT_FAILED
    down = ServiceStatus("provisioner", "c", "unreachable")
    assert status_exit_code([up, ServiceStatus("pool", "b", "not_serving"), down]) == 3
    assert EXIT_UNREACHABLE == 3


def test_help_lists_the_exit_codes_and_the_new_options() -> None:
    parser = build_parser()
    assert "130" in (parser.epilog or "") and "unreachable" in (parser.epilog or "")
    args = parser.parse_args(["search", "llama", "--inspect", "3"])
    assert args.inspect == 3
    args = parser.parse_args(["compat", "hf:org/repo", "--provisioner", "x:1"])
    assert args.provisioner == "x:1"
    args = parser.parse_args(["status"])
    assert args.timeout == 3.0 and args.format == "human"
