"""Every acknowledged write survives kill -9 of the writing process.

A child process creates (and updates) models in a loop and prints each id once `create_model`
has returned. The test kills it with SIGKILL at a random moment, reopens the database, and
checks that it opens cleanly, passes `PRAGMA integrity_check`, and holds every printed id.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.catalog.store import CatalogStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_ROUNDS = 4
_REPO_ROOT = Path(__file__).resolve().parents[2]

_WRITER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from pathlib import Path

    from services.catalog.domain import Model, ModelSource, SourceKind
    from services.catalog.store import CatalogStore

    store = CatalogStore.open(Path(sys.argv[1]))
    round_number = sys.argv[2]
    print("ready", flush=True)
    index = 0
    while True:
        now = datetime.now(UTC)
        model = Model(
            id=f"r{round_number}-{index}",
            source=ModelSource(kind=SourceKind.LOCAL, path=f"/m/{round_number}/{index}"),
            paths=[f"/m/{round_number}/{index}.gguf"],
            labels={"round": round_number},
            created_at=now,
            updated_at=now,
        )
        created = store.create_model(model)
        print(created.id, flush=True)  # acknowledged: the commit has returned
        if index % 3 == 0:
            store.update_model(created.model_copy(update={"display_name": "updated"}))
        index += 1
    """
)


def _run_round(db_path: Path, round_number: int, rng: random.Random) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(_REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db_path), str(round_number)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        # Gate on the child's own signal that the store is open, never on a sleep.
        first = child.stdout.readline()
        assert first.strip() == "ready", child.stderr.read() if child.stderr else first
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        rest, errors = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=20)
    assert child.returncode == -signal.SIGKILL, errors
    # A line is only complete (newline included) if the print finished before the kill.
    return [line for line in rest.splitlines(keepends=True) if line.endswith("\n")]


def test_acknowledged_models_survive_kill_9(tmp_path: Path) -> None:
    db_path = tmp_path / "home" / "catalog.db"
    rng = random.Random()
    acknowledged: list[str] = []
    for round_number in range(_ROUNDS):
        lines = _run_round(db_path, round_number, rng)
        acknowledged.extend(line.strip() for line in lines)

        with sqlite3.connect(db_path) as check:
            assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        check.close()
        store = CatalogStore.open(db_path)
        try:
            for model_id in acknowledged:
                assert store.get_model(model_id).id == model_id
            stored = store.count_models()
        finally:
            store.close()
        # At most the one write in flight at the kill may exist without an acknowledgement.
        assert len(acknowledged) <= stored <= len(acknowledged) + round_number + 1
    assert acknowledged, "the writer acknowledged nothing in any round"
