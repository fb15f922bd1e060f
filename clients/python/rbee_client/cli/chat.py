"""`rbee chat TARGET` and `rbee generate TARGET PROMPT`: text from an LLM worker.

`rbee chat` is an interactive session: the conversation (after an optional `--system` prompt)
is sent whole on every turn, tokens are written to stdout as they arrive, `/reset` forgets the
conversation, `/exit` (or end of input) leaves. Ctrl-C during a reply cancels that reply (the
stream is cancelled, so the worker stops) and the session goes on; Ctrl-C at the prompt leaves
with exit code 130. `-p PROMPT` asks once and exits (`-p -` reads the prompt from stdin).
`rbee generate` completes a raw prompt (no chat template).

Output: the reply's text on stdout, messages on stderr. With `--verbose` a stats line (prompt
and generated tokens, tokens/s, time to first token, finish reason) follows each reply on stderr.
With `--format json` every event is one JSON line on stdout: `{"target": {...}}` (the worker
used), `{"delta": {...}}` per token delta, and `{"result": {...}, "text": "..."}` at the end of
each reply (in a session, one reply per input line).

`add_commands` registers chat, generate and imagine (rbee_client.cli.imagine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format

from rbee.worker.v1 import generation_pb2 as gen
from rbee_client.cli.main import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, client_security
from rbee_client.cli.output import stderr_console
from rbee_client.cli.target import (
    ResolvedWorker,
    Task,
    add_target_arguments,
    resolve_worker,
)

REPL_HELP = (
    "/reset forgets the conversation, /exit leaves (or Ctrl-D); "
    'a line of """ starts and ends a multi-line message; Ctrl-C stops a reply'
)
MULTILINE_FENCE = '"""'


# ---- request parameters ----------------------------------------------------------------------


def _read_text_file(path: str, what: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(
            f"cannot read the {what} {path}: {exc.strerror or exc}",
            hint="check the path",
            code=EXIT_USAGE,
        ) from None


def sampling_from_args(args: argparse.Namespace) -> gen.SamplingParams:
    """SamplingParams from the sampling flags; a flag not given stays unset (the worker's
    default applies)."""
    params = gen.SamplingParams()
    for name in (
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "repeat_last_n",
        "presence_penalty",
        "frequency_penalty",
        "seed",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(params, name, value)
    for token_id, bias in getattr(args, "logit_bias", None) or ():
        params.logit_bias[token_id] = bias
    if getattr(args, "json_schema", None):
        text = _read_text_file(args.json_schema, "JSON schema")
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(
                f"the JSON schema {args.json_schema} is not JSON: {exc}",
                hint='e.g. {"type": "object"}',
                code=EXIT_USAGE,
            ) from None
        params.json_schema = text
    elif getattr(args, "grammar", None):
        params.grammar = _read_text_file(args.grammar, "grammar")
    return params


def stopping_from_args(args: argparse.Namespace) -> gen.StoppingCriteria:
    """StoppingCriteria from --max-tokens, --stop (repeatable) and --ignore-eos."""
    return gen.StoppingCriteria(
        max_tokens=args.max_tokens or 0,
        stop=list(args.stop or ()),
        ignore_eos=bool(getattr(args, "ignore_eos", False)),
    )


def _logit_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not TOKEN_ID=BIAS: {text!r} (e.g. 15043=-100)") from None


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The per-request sampling and stopping flags (unset = the worker's default)."""
    g = parser.add_argument_group("sampling (unset: the worker's defaults)")
    g.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, help="0 = disabled (default 40)")
    g.add_argument("--top-p", type=float, help="1 = disabled (default 0.95)")
    g.add_argument("--min-p", type=float, help="0 = disabled (default 0.05)")
    g.add_argument("--typical-p", type=float, help="1 = disabled")
    g.add_argument("--repeat-penalty", type=float, help="1 = disabled")
    g.add_argument("--repeat-last-n", type=int, help="tokens the repeat penalty looks at")
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=_non_negative_int, help="for repeatable output")
    g.add_argument(
        "--logit-bias",
        type=_logit_bias,
        action="append",
        metavar="TOKEN_ID=BIAS",
        help="repeatable; -100 bans a token",
    )
    constraint = g.add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema", metavar="FILE", help="constrain the output to this JSON schema"
    )
    constraint.add_argument("--grammar", metavar="FILE", help="constrain by a GBNF grammar")
    s = parser.add_argument_group("stopping")
    s.add_argument(
        "--max-tokens", type=_non_negative_int, default=0, help="0 = until the model stops"
    )
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop sequence (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep going past end of sequence")


# ---- replies ---------------------------------------------------------------------------------


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def finish_reason_name(reason: int) -> str:
    """FINISH_REASON_STOP_SEQUENCE -> "stop_sequence"."""
    try:
        return gen.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()  # type: ignore[arg-type]
    except ValueError:
        return "unknown"


def stats_line(result: gen.GenerationResult, *, client_ttft: float | None = None) -> str:
    """One line about a finished reply: tokens, speed, time to first token, why it stopped."""
    usage = result.usage
    parts = [f"{usage.prompt_tokens} prompt tokens"]
    if usage.cached_prompt_tokens:
        parts[-1] += f" ({usage.cached_prompt_tokens} cached)"
    parts.append(f"{usage.completion_tokens} tokens")
    timings = result.timings
    if timings.tokens_per_second:
        parts.append(f"{timings.tokens_per_second:.1f} tokens/s")
    ttft = (
        _seconds(timings.time_to_first_token)
        if timings.HasField("time_to_first_token")
        else client_ttft
    )
    if ttft is not None:
        parts.append(f"TTFT {ttft * 1000:.0f} ms")
    reason = finish_reason_name(result.finish_reason)
    if result.finish_reason == gen.FINISH_REASON_STOP_SEQUENCE and result.stop_sequence:
        reason += f" {result.stop_sequence!r}"
    parts.append(f"finish {reason}")
    parts.append(f"seed {result.seed}")
    return ", ".join(parts)


@dataclass
class Reply:
    """A reply as streamed: its text, the terminal result, and when the first text came."""

    text: str = ""
    result: gen.GenerationResult | None = None
    ttft: float | None = None  # seconds from the request to the first non-empty delta


def _json_line(obj: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(obj, sort_keys=True) + "\n")
    out.flush()


# C0 and C1 control characters other than newline and tab: a model's output must not drive the
# terminal (an ESC sequence can move the cursor, retitle the window or worse).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters (but newline and tab) become U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


def stream_reply(
    events: Iterable[gen.TokenDelta | gen.GenerationResult],
    out: TextIO,
    *,
    as_json: bool,
    clock: Callable[[], float] = time.monotonic,
) -> Reply:
    """Write a reply to `out` as it arrives (text, or JSON lines) and return it.

    A KeyboardInterrupt while streaming closes `events` (which cancels the call) and propagates.
    """
    reply = Reply()
    parts: list[str] = []
    started = clock()
    iterator = iter(events)
    try:
        for event in iterator:
            if isinstance(event, gen.TokenDelta):
                if event.text and reply.ttft is None:
                    reply.ttft = clock() - started
                parts.append(event.text)
                if as_json:
                    _json_line({"delta": json_format.MessageToDict(event)}, out)
                elif event.text:
                    out.write(printable(event.text) if out.isatty() else event.text)
                    out.flush()
            else:
                reply.result = event
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # a generator from the SDK: cancels the call if it is still running
        reply.text = "".join(parts)
    if as_json and reply.result is not None:
        _json_line({"result": json_format.MessageToDict(reply.result), "text": reply.text}, out)
    elif not as_json and reply.text and not reply.text.endswith("\n"):
        out.write("\n")
        out.flush()
    return reply


# ---- the conversation ------------------------------------------------------------------------


@dataclass
class Conversation:
    """The messages of a chat session, oldest first, after an optional system prompt."""

    system: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)  # (role, content)

    def messages(self, user_text: str | None = None) -> list[tuple[str, str]]:
        """The messages to send: system, the turns so far, then `user_text` when given."""
        messages = [("system", self.system)] if self.system else []
        messages.extend(self.turns)
        if user_text is not None:
            messages.append(("user", user_text))
        return messages

    def add_turn(self, user_text: str, reply: str) -> None:
        self.turns.append(("user", user_text))
        self.turns.append(("assistant", reply))

    def reset(self) -> None:
        self.turns.clear()


class EndOfInput(Exception):
    """The user left: end of input (Ctrl-D) or /exit."""


def read_message(read_line: Callable[[str], str], *, prompt: str, more: str) -> str:
    """One user message: a line, or the lines between two lines of three double quotes.

    `read_line(prompt)` returns a line without its newline and raises EOFError at the end of
    input (as `input` does). An end of input inside a fenced block sends what came before it.
    """
    line = read_line(prompt)
    if line.strip() != MULTILINE_FENCE:
        return line
    lines: list[str] = []
    while True:
        try:
            line = read_line(more)
        except EOFError:
            break
        if line.strip() == MULTILINE_FENCE:
            break
        lines.append(line)
    return "\n".join(lines)


def _stdin_reader(stream: TextIO) -> Callable[[str], str]:
    """`input` for a terminal (with line editing), plain line reads for a pipe."""
    if stream.isatty():
        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401  (line editing and history for input())

        def read_tty(prompt: str) -> str:
            return input(prompt)

        return read_tty

    def read_pipe(prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read_pipe


@dataclass
class ChatSettings:
    """What every turn of a session sends besides the messages."""

    sampling: gen.SamplingParams
    stopping: gen.StoppingCriteria
    model: str = ""
    chat_template: str = ""
    timeout: float | None = None


SendChat = Callable[[list[tuple[str, str]]], Iterator[gen.TokenDelta | gen.GenerationResult]]


def run_repl(
    send: SendChat,
    conversation: Conversation,
    *,
    read_line: Callable[[str], str],
    out: TextIO,
    err: TextIO,
    as_json: bool,
    verbose: bool,
    interactive: bool,
) -> int:
    """The chat loop; returns the exit code (0 at /exit or end of input, 130 on Ctrl-C at the
    prompt)."""
    prompt, more = (">>> ", "... ") if interactive else ("", "")
    if interactive:
        print(REPL_HELP, file=err, flush=True)
    while True:
        try:
            text = read_message(read_line, prompt=prompt, more=more)
        except EOFError:
            if interactive:
                print(file=err)
            return EXIT_OK
        except KeyboardInterrupt:
            print(file=err, flush=True)
            return EXIT_INTERRUPTED
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return EXIT_OK
        if command == "/reset":
            conversation.reset()
            print("(conversation forgotten)", file=err, flush=True)
            continue
        if command in ("/help", "/?"):
            print(REPL_HELP, file=err, flush=True)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; {REPL_HELP}", file=err, flush=True)
            continue
        try:
            reply = stream_reply(send(conversation.messages(text)), out, as_json=as_json)
        except KeyboardInterrupt:
            # The reply was cancelled: leave this turn out of the conversation, keep the session.
            if not as_json:
                out.write("\n")
                out.flush()
            print("(reply cancelled)", file=err, flush=True)
            continue
        conversation.add_turn(text, reply.text)
        if verbose and reply.result is not None:
            print(stats_line(reply.result, client_ttft=reply.ttft), file=err, flush=True)


# ---- commands --------------------------------------------------------------------------------


def _prompt_text(value: str) -> str:
    if value == "-":
        return sys.stdin.read()
    return value


def _say_target(args: argparse.Namespace, resolved: ResolvedWorker) -> None:
    if args.format == "json":
        _json_line({"target": resolved.to_json()}, sys.stdout)


def _worker_client(args: argparse.Namespace, resolved: ResolvedWorker) -> Any:
    from rbee_client.worker import WorkerClient

    return WorkerClient(resolved.endpoint, security=client_security(), timeout=args.timeout)


def _finish_one_shot(args: argparse.Namespace, reply: Reply) -> int:
    if args.verbose and reply.result is not None:
        stderr_console().print(
            stats_line(reply.result, client_ttft=reply.ttft), markup=False, highlight=False
        )
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    stopping = stopping_from_args(args)
    template = _read_text_file(args.chat_template, "chat template") if args.chat_template else ""
    prompt = _prompt_text(args.prompt) if args.prompt is not None else None
    resolved = resolve_worker(args, Task.TEXT, args.target)
    _say_target(args, resolved)
    conversation = Conversation(system=args.system or "")
    as_json = args.format == "json"
    with _worker_client(args, resolved) as worker:

        def send(
            messages: list[tuple[str, str]],
        ) -> Iterator[gen.TokenDelta | gen.GenerationResult]:
            events: Iterator[gen.TokenDelta | gen.GenerationResult] = worker.chat(
                messages,
                sampling=sampling,
                stopping=stopping,
                chat_template=template,
                timeout=args.request_timeout,
            )
            return events

        if prompt is not None:
            reply = stream_reply(send(conversation.messages(prompt)), sys.stdout, as_json=as_json)
            return _finish_one_shot(args, reply)
        return run_repl(
            send,
            conversation,
            read_line=_stdin_reader(sys.stdin),
            out=sys.stdout,
            err=sys.stderr,
            as_json=as_json,
            verbose=args.verbose,
            interactive=sys.stdin.isatty(),
        )


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    stopping = stopping_from_args(args)
    prompt = _prompt_text(args.prompt)
    resolved = resolve_worker(args, Task.TEXT, args.target)
    _say_target(args, resolved)
    with _worker_client(args, resolved) as worker:
        events = worker.generate(
            prompt, sampling=sampling, stopping=stopping, timeout=args.request_timeout
        )
        reply = stream_reply(events, sys.stdout, as_json=args.format == "json")
    return _finish_one_shot(args, reply)


def _optional_seconds(text: str) -> float | None:
    value = float(text)
    return None if value <= 0 else value


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `rbee chat`, `rbee generate` and `rbee imagine`."""
    from rbee_client.cli.imagine import add_commands as add_imagine_commands

    def generation_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="store_true", help="a stats line after each reply")
        p.add_argument(
            "--request-timeout",
            type=_optional_seconds,
            default=None,
            help="seconds a reply may take (default: no limit; Ctrl-C stops it)",
        )
        add_sampling_arguments(p)
        add_target_arguments(p, llm=True)

    p = sub.add_parser(
        "chat",
        parents=[common],
        help="chat with an LLM worker or model (interactive, or -p for one reply)",
        description="TARGET: a worker (workers/ID, ID, HOST:PORT) or a model (models/ID, ID, "
        "name); for a model a worker is reused or spawned.",
    )
    p.add_argument("target", metavar="TARGET", help="a worker or a model")
    p.add_argument("-p", "--prompt", help="ask once and exit; `-` reads the prompt from stdin")
    p.add_argument("--system", help="the system prompt")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use")
    generation_arguments(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "generate",
        parents=[common],
        help="complete a raw prompt (no chat template)",
        description="TARGET: a worker (workers/ID, ID, HOST:PORT) or a model (models/ID, ID, "
        "name); for a model a worker is reused or spawned.",
    )
    p.add_argument("target", metavar="TARGET", help="a worker or a model")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt; `-` reads it from stdin")
    generation_arguments(p)
    p.set_defaults(func=cmd_generate)

    add_imagine_commands(sub, common)
