"""`rbee chat`, `rbee generate`, `rbee imagine` without services: argument parsing, TARGET
classification, flags -> SamplingParams / ImageParams, the chat loop, output files."""

from __future__ import annotations

import argparse
import datetime
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee.common.v1 import runtime_pb2
from rbee.worker.v1 import generation_pb2 as gen
from rbee.worker.v1 import image_pb2 as img
from rbee.worker.v1 import worker_pb2
from rbee_client.cli.chat import (
    Conversation,
    read_message,
    run_repl,
    sampling_from_args,
    stats_line,
    stopping_from_args,
    stream_reply,
)
from rbee_client.cli.imagine import (
    check_writable,
    image_params_from_args,
    output_paths,
    parse_lora,
    progress_line,
    write_atomically,
)
from rbee_client.cli.main import EXIT_INTERRUPTED, EXIT_OK, CliError, build_parser
from rbee_client.cli.target import (
    TargetKind,
    Task,
    check_model_kind,
    check_worker_kind,
    choose_reusable,
    classify_target,
    match_models_by_name,
    normalize_device,
    restrict_target,
    worker_task,
)
from services.catalog.domain import (
    Model,
    ModelFormat,
    ModelMetadata,
    ModelSource,
    ModelState,
    ModelType,
    SourceKind,
)

pytestmark = pytest.mark.unit

WHEN = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# ---- parsing and sampling ---------------------------------------------------------------------


def test_sampling_flags_become_sampling_params() -> None:
    args = parse(
        "chat",
        "tiny",
        "-p",
        "hi",
        "--temperature",
        "0.2",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--min-p",
        "0.1",
        "--repeat-penalty",
        "1.1",
        "--seed",
        "7",
        "--logit-bias",
        "15=-100",
        "--max-tokens",
        "16",
        "--stop",
        "\n\n",
        "--stop",
        "User:",
    )
    sampling = sampling_from_args(args)
    assert sampling.temperature == pytest.approx(0.2)
    assert sampling.top_k == 5
    assert sampling.top_p == pytest.approx(0.9)
    assert sampling.min_p == pytest.approx(0.1)
    assert sampling.repeat_penalty == pytest.approx(1.1)
    assert sampling.seed == 7
    assert dict(sampling.logit_bias) == {15: -100.0}
    assert not sampling.HasField("typical_p")
    assert sampling.WhichOneof("constraint") is None
    stopping = stopping_from_args(args)
    assert stopping.max_tokens == 16
    assert list(stopping.stop) == ["\n\n", "User:"]
    assert args.prompt == "hi" and args.target == "tiny"


def test_unset_flags_leave_the_worker_defaults() -> None:
    sampling = sampling_from_args(parse("generate", "tiny", "once upon"))
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed"):
        assert not sampling.HasField(name), name
    assert stopping_from_args(parse("generate", "tiny", "x")).max_tokens == 0


def test_temperature_zero_is_sent_not_dropped() -> None:
    sampling = sampling_from_args(parse("chat", "tiny", "--temperature", "0"))
    assert sampling.HasField("temperature") and sampling.temperature == 0.0


def test_json_schema_and_grammar_files(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    sampling = sampling_from_args(parse("chat", "t", "--json-schema", str(schema)))
    assert sampling.WhichOneof("constraint") == "json_schema"
    assert json.loads(sampling.json_schema) == {"type": "object"}

    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "yes" | "no"')
    sampling = sampling_from_args(parse("chat", "t", "--grammar", str(grammar)))
    assert sampling.grammar == 'root ::= "yes" | "no"'

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CliError) as err:
        sampling_from_args(parse("chat", "t", "--json-schema", str(broken)))
    assert err.value.code == 2
    with pytest.raises(CliError, match="cannot read"):
        sampling_from_args(parse("chat", "t", "--grammar", str(tmp_path / "missing")))


@pytest.mark.parametrize(
    "argv",
    [
        ("chat", "t", "--json-schema", "a", "--grammar", "b"),
        ("chat", "t", "--max-tokens", "-1"),
        ("chat", "t", "--logit-bias", "15"),
        ("generate", "t"),  # PROMPT is required
        ("imagine", "a cat"),  # -o is required
        ("imagine", "a cat", "-o", "x.png", "-W", "65"),
        ("imagine", "a cat", "-o", "x.png", "--count", "0"),
        ("imagine", "a cat", "-o", "x.png", "--model", "m", "--worker", "w"),
        ("imagine", "a cat", "-o", "x.png", "--lora", "style:9"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2


# ---- TARGET classification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("workers/w1", TargetKind.WORKER, "workers/w1"),
        ("models/tiny", TargetKind.MODEL, "models/tiny"),
        ("127.0.0.1:50100", TargetKind.ENDPOINT, "127.0.0.1:50100"),
        ("localhost:7000", TargetKind.ENDPOINT, "localhost:7000"),
        ("[::1]:7000", TargetKind.ENDPOINT, "[::1]:7000"),
        ("unix:/tmp/w.sock", TargetKind.ENDPOINT, "unix:/tmp/w.sock"),
        ("tiny", TargetKind.BARE, "tiny"),
        ("Llama 3 8B", TargetKind.BARE, "Llama 3 8B"),
        ("llama3:8b", TargetKind.BARE, "llama3:8b"),  # ollama-style tag, not a port
        ("host:99999", TargetKind.BARE, "host:99999"),  # not a port either
        ("  tiny ", TargetKind.BARE, "tiny"),
    ],
)
def test_classify_target(text: str, kind: TargetKind, value: str) -> None:
    spec = classify_target(text)
    assert (spec.kind, spec.value) == (kind, value)


def test_empty_target_is_a_usage_error() -> None:
    with pytest.raises(CliError) as err:
        classify_target("  ")
    assert err.value.code == 2


def test_restrict_target_for_worker_and_model_flags() -> None:
    bare = classify_target("w1")
    assert restrict_target(bare, TargetKind.WORKER).value == "workers/w1"
    assert restrict_target(bare, TargetKind.MODEL).kind is TargetKind.BARE
    endpoint = classify_target("127.0.0.1:9000")
    assert restrict_target(endpoint, TargetKind.WORKER) == endpoint
    with pytest.raises(CliError, match="not a model"):
        restrict_target(endpoint, TargetKind.MODEL)
    with pytest.raises(CliError, match="not a worker"):
        restrict_target(classify_target("models/m"), TargetKind.WORKER)


def test_normalize_device() -> None:
    assert normalize_device("cuda:0") == "devices/cuda-0"
    assert normalize_device("cpu") == "devices/cpu"
    assert normalize_device("devices/cuda-1") == "devices/cuda-1"
    assert normalize_device("") == "" and normalize_device("auto") == "auto"


# ---- choosing a worker ------------------------------------------------------------------------


def pool_worker(
    name: str,
    *,
    model: str = "models/tiny",
    state: int = worker_pb2.WORKER_STATE_READY,
    worker_type: str = "worker-types/cpu-llm",
    device: str = "devices/cpu",
) -> worker_pb2.Worker:
    worker = worker_pb2.Worker(
        name=f"workers/{name}",
        model=model,
        state=state,  # type: ignore[arg-type]
        worker_type=worker_type,
        endpoint=f"127.0.0.1:{7000 + len(name)}",
    )
    worker.device.name = device
    return worker


def test_worker_task_from_backend_or_type() -> None:
    assert worker_task(pool_worker("a")) is Task.TEXT
    assert worker_task(pool_worker("b", worker_type="worker-types/cuda-sd")) is Task.IMAGE
    by_backend = worker_pb2.Worker(backend=runtime_pb2.BACKEND_DIFFUSERS)
    assert worker_task(by_backend) is Task.IMAGE
    assert worker_task(worker_pb2.Worker()) is None


def test_choose_reusable_prefers_ready_then_busy_then_loading() -> None:
    loading = pool_worker("a-loading", state=worker_pb2.WORKER_STATE_LOADING)
    busy = pool_worker("b-busy", state=worker_pb2.WORKER_STATE_BUSY)
    ready = pool_worker("c-ready")
    failed = pool_worker("d-failed", state=worker_pb2.WORKER_STATE_FAILED)
    other_model = pool_worker("e-other", model="models/other")
    workers = [loading, busy, ready, failed, other_model]
    assert choose_reusable(workers, model="models/tiny", task=Task.TEXT) is ready
    assert choose_reusable([loading, busy], model="models/tiny", task=Task.TEXT) is busy
    assert choose_reusable([loading, failed], model="models/tiny", task=Task.TEXT) is loading
    assert choose_reusable([failed, other_model], model="models/tiny", task=Task.TEXT) is None


def test_choose_reusable_respects_task_device_and_type() -> None:
    sd = pool_worker("sd", worker_type="worker-types/cpu-sd")
    gpu = pool_worker("gpu", worker_type="worker-types/cuda-llm", device="devices/cuda-0")
    assert choose_reusable([sd], model="models/tiny", task=Task.TEXT) is None
    assert choose_reusable([sd], model="models/tiny", task=Task.IMAGE) is sd
    assert choose_reusable([gpu], model="models/tiny", task=Task.TEXT, device="devices/cpu") is None
    assert (
        choose_reusable([gpu], model="models/tiny", task=Task.TEXT, worker_type="cpu-llm") is None
    )
    assert (
        choose_reusable([gpu], model="models/tiny", task=Task.TEXT, worker_type="cuda-llm") is gpu
    )


def catalog_model(
    model_id: str,
    model_type: ModelType,
    *,
    display_name: str = "",
    state: ModelState = ModelState.READY,
    name: str | None = None,
) -> Model:
    fmt = ModelFormat.GGUF if model_type is ModelType.LLM else ModelFormat.DIFFUSERS
    return Model(
        id=model_id,
        display_name=display_name,
        source=ModelSource(kind=SourceKind.LOCAL, path="/m"),
        state=state,
        metadata=ModelMetadata(format=fmt, model_type=model_type, name=name),
        created_at=WHEN,
        updated_at=WHEN,
    )


def test_check_model_kind() -> None:
    check_model_kind(catalog_model("tiny", ModelType.LLM), Task.TEXT)
    check_model_kind(catalog_model("sd", ModelType.IMAGE), Task.IMAGE)
    with pytest.raises(CliError) as err:
        check_model_kind(catalog_model("sd", ModelType.IMAGE), Task.TEXT)
    assert err.value.code == 1
    assert "image model" in err.value.message and "rbee imagine" in err.value.hint
    with pytest.raises(CliError, match="is an LLM; rbee imagine needs an image model") as err:
        check_model_kind(catalog_model("tiny", ModelType.LLM), Task.IMAGE)
    assert "rbee chat tiny" in err.value.hint
    with pytest.raises(CliError, match="lora"):
        check_model_kind(catalog_model("style", ModelType.LORA), Task.IMAGE)
    with pytest.raises(CliError, match="downloading"):
        check_model_kind(
            catalog_model("tiny", ModelType.LLM, state=ModelState.DOWNLOADING), Task.TEXT
        )


def test_check_worker_kind() -> None:
    check_worker_kind(pool_worker("a"), Task.TEXT, "workers/a")
    with pytest.raises(CliError, match="is an image") as err:
        check_worker_kind(
            pool_worker("s", worker_type="worker-types/cpu-sd"), Task.TEXT, "workers/s"
        )
    assert err.value.reason == "WRONG_ENGINE" and "rbee imagine" in err.value.hint


def test_match_models_by_name() -> None:
    models = [
        catalog_model("a", ModelType.LLM, display_name="Tiny Llama"),
        catalog_model("b", ModelType.LLM, name="tiny-llama"),
        catalog_model("c", ModelType.LLM, display_name="Other"),
    ]
    assert [m.id for m in match_models_by_name(models, "tiny llama")] == ["a"]
    assert [m.id for m in match_models_by_name(models, "TINY-LLAMA")] == ["b"]
    assert match_models_by_name(models, "nothing") == []


# ---- replies and the chat loop ----------------------------------------------------------------


def result(prompt_tokens: int = 5, completion_tokens: int = 3) -> gen.GenerationResult:
    res = gen.GenerationResult(
        finish_reason=gen.FINISH_REASON_LENGTH,
        seed=42,
        usage=gen.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
    )
    res.timings.tokens_per_second = 12.5
    res.timings.time_to_first_token.FromMilliseconds(30)
    return res


def events(*texts: str) -> Iterator[gen.TokenDelta | gen.GenerationResult]:
    for text in texts:
        yield gen.TokenDelta(text=text, token_ids=[1])
    yield result()


def test_stream_reply_writes_text_as_it_comes() -> None:
    out = io.StringIO()
    reply = stream_reply(events("Hel", "", "lo"), out, as_json=False)
    assert out.getvalue() == "Hello\n"
    assert reply.text == "Hello" and reply.result is not None
    assert reply.ttft is not None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_no_control_characters_from_the_model() -> None:
    escape = "\x1b]0;owned\x07\x1b[2J"  # retitle the window, clear the screen
    out = _Terminal()
    reply = stream_reply(events("hi", escape, "\tok\n"), out, as_json=False)
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert out.getvalue().startswith("hi\ufffd]0;owned\ufffd") and "\tok\n" in out.getvalue()
    assert reply.text == "hi" + escape + "\tok\n"  # the reply itself is kept as it came
    piped = io.StringIO()  # not a terminal: the bytes pass through for scripts
    stream_reply(events(escape), piped, as_json=False)
    assert piped.getvalue() == escape + "\n"


def test_stream_reply_json_lines() -> None:
    out = io.StringIO()
    stream_reply(events("a", "b"), out, as_json=True)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [next(iter(line)) for line in lines[:2]] == ["delta", "delta"]
    assert lines[0]["delta"]["text"] == "a"
    assert lines[-1]["text"] == "ab"
    assert lines[-1]["result"]["finishReason"] == "FINISH_REASON_LENGTH"
    assert lines[-1]["result"]["usage"]["promptTokens"] == 5


def test_stats_line() -> None:
    line = stats_line(result())
    assert line == ("5 prompt tokens, 3 tokens, 12.5 tokens/s, TTFT 30 ms, finish length, seed 42")
    stopped = gen.GenerationResult(
        finish_reason=gen.FINISH_REASON_STOP_SEQUENCE, stop_sequence="User:"
    )
    assert "finish stop_sequence 'User:'" in stats_line(stopped, client_ttft=0.5)
    assert "TTFT 500 ms" in stats_line(stopped, client_ttft=0.5)


def lines_reader(*lines: str) -> object:
    queue = list(lines)

    def read(prompt: str) -> str:
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if item == "^C":
            raise KeyboardInterrupt
        return item

    return read


def test_read_message_multiline_block() -> None:
    read = lines_reader('"""', "line one", "line two", '"""', "next")
    assert read_message(read, prompt="", more="") == "line one\nline two"  # type: ignore[arg-type]
    assert read_message(read, prompt="", more="") == "next"  # type: ignore[arg-type]


class RecordingWorker:
    """Stands in for the worker's Chat stream: records the messages of each turn."""

    def __init__(self, replies: list[list[str]]) -> None:
        self.replies = replies
        self.sent: list[list[tuple[str, str]]] = []
        self.closed = 0

    def send(
        self, messages: list[tuple[str, str]]
    ) -> Iterator[gen.TokenDelta | gen.GenerationResult]:
        self.sent.append(list(messages))
        texts = self.replies.pop(0)

        def stream() -> Iterator[gen.TokenDelta | gen.GenerationResult]:
            try:
                for text in texts:
                    if text == "^C":
                        raise KeyboardInterrupt
                    yield gen.TokenDelta(text=text)
                yield result()
            finally:
                self.closed += 1

        return stream()


def repl(worker: RecordingWorker, *lines: str, system: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_repl(
        worker.send,
        Conversation(system=system),
        read_line=lines_reader(*lines),  # type: ignore[arg-type]
        out=out,
        err=err,
        as_json=False,
        verbose=True,
        interactive=False,
    )
    return code, out.getvalue(), err.getvalue()


def test_repl_keeps_history_and_resets() -> None:
    worker = RecordingWorker([["Hi", "!"], ["Fine."], ["Again."]])
    code, out, err = repl(worker, "hello", "how are you", "/reset", "", "bye", system="be brief")
    assert code == EXIT_OK
    assert out == "Hi!\nFine.\nAgain.\n"
    assert worker.sent[0] == [("system", "be brief"), ("user", "hello")]
    assert worker.sent[1] == [
        ("system", "be brief"),
        ("user", "hello"),
        ("assistant", "Hi!"),
        ("user", "how are you"),
    ]
    assert worker.sent[2] == [("system", "be brief"), ("user", "bye")]  # after /reset
    assert err.count("prompt tokens") == 3  # --verbose: a stats line per reply
    assert "forgotten" in err


def test_repl_ctrl_c_during_a_reply_cancels_it_and_keeps_the_session() -> None:
    worker = RecordingWorker([["partial", "^C"], ["ok"]])
    code, out, err = repl(worker, "first", "second", "/exit", "never read")
    assert code == EXIT_OK
    assert "(reply cancelled)" in err
    assert worker.closed == 2  # the cancelled stream was closed (the SDK cancels the call)
    assert worker.sent[1] == [("user", "second")]  # the cancelled turn left no trace
    assert out.endswith("ok\n")


def test_repl_ctrl_c_at_the_prompt_exits_130() -> None:
    worker = RecordingWorker([["one"]])
    code, _, _ = repl(worker, "hello", "^C")
    assert code == EXIT_INTERRUPTED
    assert len(worker.sent) == 1


def test_repl_unknown_command_is_not_sent() -> None:
    worker = RecordingWorker([])
    code, _, err = repl(worker, "/nope")
    assert code == EXIT_OK and worker.sent == [] and "unknown command /nope" in err


# ---- imagine ----------------------------------------------------------------------------------


def test_image_flags_become_image_params(tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    args = parse(
        "imagine",
        "a red fox",
        "-o",
        str(tmp_path / "fox.webp"),
        "--model",
        "tiny-sd",
        "-n",
        "blurry",
        "-W",
        "64",
        "-H",
        "128",
        "--steps",
        "4",
        "--guidance",
        "0",
        "--seed",
        "3",
        "--scheduler",
        "euler_a",
        "--count",
        "2",
        "--clip-skip",
        "2",
        "--eta",
        "0.5",
        "--lora",
        f"{lora}:0.7",
        "--lora",
        "detail",
    )
    params = image_params_from_args(args)
    assert params.prompt == "a red fox" and params.negative_prompt == "blurry"
    assert (params.width, params.height, params.steps, params.count) == (64, 128, 4, 2)
    assert params.HasField("guidance_scale") and params.guidance_scale == 0.0
    assert params.seed == 3 and params.scheduler == "euler_a"
    assert params.clip_skip == 2 and params.eta == pytest.approx(0.5)
    assert params.output_format == img.IMAGE_FORMAT_WEBP
    assert params.loras[0].path == str(lora) and params.loras[0].weight == pytest.approx(0.7)
    assert params.loras[1].model == "models/detail" and not params.loras[1].HasField("weight")
    unset = image_params_from_args(parse("imagine", "x", "-o", "x.png"))
    assert not unset.HasField("seed") and not unset.HasField("guidance_scale")
    assert unset.output_format == img.IMAGE_FORMAT_PNG


def test_output_suffix_decides_the_format() -> None:
    with pytest.raises(CliError, match="suffix") as err:
        image_params_from_args(parse("imagine", "x", "-o", "x.gif"))
    assert err.value.code == 2
    jpeg = image_params_from_args(parse("imagine", "x", "-o", "x.JPG"))
    assert jpeg.output_format == img.IMAGE_FORMAT_JPEG


def test_parse_lora_forms() -> None:
    assert parse_lora("models/style:1.5").model == "models/style"
    assert parse_lora("models/style:1.5").weight == pytest.approx(1.5)
    assert parse_lora("./x.safetensors").path.endswith("/x.safetensors")
    assert parse_lora("name:with:colon").model == "models/name:with:colon"
    with pytest.raises(argparse.ArgumentTypeError):
        parse_lora(":1.0")


def test_output_paths_and_overwrite_rules(tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    assert output_paths(out, 1) == [out]
    assert output_paths(out, 3) == [tmp_path / f"cat-{i}.png" for i in (1, 2, 3)]
    check_writable(output_paths(out, 2), force=False)
    (tmp_path / "cat-2.png").write_bytes(b"old")
    with pytest.raises(CliError, match="already exists") as err:
        check_writable(output_paths(out, 2), force=False)
    assert "--force" in err.value.hint
    check_writable(output_paths(out, 2), force=True)
    with pytest.raises(CliError, match="does not exist"):
        check_writable([tmp_path / "missing" / "x.png"], force=False)


def test_write_atomically_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "img.png"
    target.write_bytes(b"old")
    write_atomically(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_progress_line() -> None:
    progress = img.ImageProgress(
        step=3, total_steps=20, image_index=1, image_count=2, steps_per_second=4.5
    )
    assert progress_line(progress) == "step 3/20 (image 2/2) 4.50 steps/s"
