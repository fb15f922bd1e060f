"""bench.stream at a tiny scale: every path runs for both output kinds, streams the same text,
and every row of the report is present. Timings are not asserted (noisy machines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.stream import (
    OUTPUT_KINDS,
    BenchConfig,
    llama_server_available,
    render_report,
    run_benchmark,
    usable_cores,
)

pytestmark = [pytest.mark.integration, pytest.mark.llm]

TOKENS = 8
TINY_SHAPE = {"n_vocab": 512, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_head_kv": 2, "n_ff": 128}


def test_tiny_run_reports_every_path_for_both_output_kinds(tmp_path: Path) -> None:
    config = BenchConfig(
        runs=1, tokens=TOKENS, workdir=tmp_path, model_overrides=TINY_SHAPE, threads=1
    )
    result = run_benchmark(config)
    assert ("threads", f"1 on every path (llama.cpp decode and batch), of {usable_cores()} "
            "usable cores") in result.facts  # fmt: skip

    assert set(result.stats) == {kind.name for kind in OUTPUT_KINDS}
    server = llama_server_available()
    for name, rows in result.stats.items():
        raw, worker, completion, llama_server = rows
        # (a) and (b) count token ids: exactly the requested number, with the same text.
        for row in (raw, worker):
            assert row.tokens == [TOKENS], (name, row.label, row.tokens)
            assert row.text_matches == [True], (name, row.label, row.runs[0].text)
            assert row.tokens_per_second() > 0 and row.ttft() > 0
        measured = [completion, llama_server] if server else [completion]
        for row in measured:
            # create_completion finishes a character split at max_tokens: a token or two more.
            assert row.tokens and row.tokens[0] is not None, (name, row.label)
            assert TOKENS <= row.tokens[0] <= TOKENS + 2, (name, row.label, row.tokens)
            assert row.text_matches == [True], (name, row.label, row.runs[0].text)
        if not server:
            assert llama_server.unavailable.startswith("n/a") and not llama_server.runs

    report = render_report(result, "python -m bench.stream --runs 1", TOKENS)
    for kind in OUTPUT_KINDS:
        assert f"## {kind.title}" in report
    for label in ("(a) raw loop", "(b) rbee worker", "(c) create_completion", "(d) llama_cpp"):
        assert report.count(label) == len(OUTPUT_KINDS), label
    assert report.count("target (b) >= 0.95x (a) tokens/s") == len(OUTPUT_KINDS)
    # The multi-byte output really is CJK spelled by byte tokens.
    cjk = result.stats["cjk"][0].runs[0].text.replace("\ufffd", "")
    assert cjk and all("\u4e00" <= char <= "\u9fff" for char in cjk)
