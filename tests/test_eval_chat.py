"""The chat CLI: the session logic in-process, then launch/chat.py through a pipe and in a
real pseudo-terminal (pexpect)."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conkd_scale.data.schema import RECOMMENDER, SEEKER, item_token
from conkd_scale.eval.catalog_io import load_item_catalog
from conkd_scale.eval.chat import ChatSession, run_pipe
from conkd_scale.eval.generation import Generated, GenerationSettings, build_generator
from tests.tiny_lm import ensure_tiny_setup

ROOT = Path(__file__).resolve().parents[1]
CHAT = str(ROOT / "launch" / "chat.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_tiny_setup(tmp_path_factory.getbasetemp() / "eval_tiny")


@pytest.fixture
def session(setup: dict[str, Path]) -> ChatSession:
    settings = GenerationSettings(max_new_tokens=12, progress=False)
    return ChatSession(build_generator(setup["lm"], settings), load_item_catalog(setup["lm"]))


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "TRANSFORMERS_VERBOSITY": "error",
    }


def test_session_history_commands_and_rendering(session: ChatSession) -> None:
    r1 = session.respond("Hi,   I love   horror movies")
    assert session.history[0] == (SEEKER, "Hi, I love horror movies")
    assert session.history[1] == (RECOMMENDER, r1.reply)
    session.respond("anything else?")
    assert len(session.history) == 4
    assert session.command("/mode rec") == ("mode: rec", False)
    assert session.respond("one more").mode == "rec"
    assert session.command("/mode nope")[0].startswith("usage")
    assert session.mode == "rec"
    assert session.command("/reset") == ("(new conversation)", False)
    assert session.history == []
    assert session.command("/frobnicate")[0].startswith("unknown command")
    assert session.command("/quit") == ("bye", True)
    item = session.catalog.ids[0]
    shown = session.render(Generated(f"try {item_token(item)} !", "rec", [item]))
    assert shown == f"try {session.catalog.title(item)}!"


def test_run_pipe_in_process(session: ChatSession) -> None:
    out, err = io.StringIO(), io.StringIO()
    rc = run_pipe(
        session, ["hello\n", "\n", "/mode gen\n", "what now?\n", "/quit\n", "x\n"], out, err
    )
    assert rc == 0
    assert len(out.getvalue().splitlines()) == 2  # one line per user turn, none for commands
    assert "mode: gen" in err.getvalue() and "bye" in err.getvalue()
    assert len(session.history) == 4  # the line after /quit was not read


def test_chat_through_a_pipe(setup: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, CHAT, "--model", str(setup["lm"]), "max_new_tokens=10"],
        input="hi there\n/mode rec\nI like horror movies\nthanks\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    assert len(lines) == 4 and lines[-1] == ""  # three replies, then EOF ends the chat
    assert "<item_" not in proc.stdout  # titles, never raw item tokens
    assert "mode: rec" in proc.stderr


def test_chat_missing_model_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("chat_cli", CHAT)
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_chat_in_a_terminal(setup: dict[str, Path]) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        [CHAT, "--model", str(setup["lm"]), "max_new_tokens=10"],
        env=_env(),
        encoding="utf-8",
        timeout=90,
    )
    try:
        child.expect("commands: /mode")
        child.expect_exact("you> ")
        child.sendline("hello, I like comedies")
        child.expect_exact("bot> ")
        child.expect_exact("you> ")
        assert "<item_" not in child.before
        child.sendline("/mode gen")
        child.expect_exact("mode: gen")
        child.expect_exact("you> ")
        child.sendline("any other idea?")
        child.expect_exact("bot> ")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(new conversation)")
        child.sendline("/quit")
        child.expect_exact("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
