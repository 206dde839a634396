"""engram_contract.tokens: a secret file's keys, one per line, re-read when the file changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engram_contract.tokens import KeyFile, parse_keys, short_keys


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _swap(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_keys_are_the_non_blank_lines_in_order() -> None:
    assert parse_keys(b"  a-key \n\n\tb-key\r\n") == (b"a-key", b"b-key")
    assert parse_keys(b"\n \n") == ()
    assert short_keys((b"x" * 16, b"short")) == [2]


def test_key_file_follows_changes_at_most_every_check(tmp_path: Path) -> None:
    path, clock = tmp_path / "secret", Clock()
    _swap(path, "old-key\n")
    keys = KeyFile(path, check_every=1.0, clock=clock)
    assert keys.current_text() == "old-key" and keys.accepted_text() == ("old-key",)
    _swap(path, "new-key\nold-key\n")
    clock.now = 0.5
    assert keys.current_text() == "old-key"  # not checked again yet
    clock.now = 1.0
    assert keys.current_text() == "new-key"
    assert keys.accepted_text() == ("new-key", "old-key")
    assert keys.reloads == 1


def test_key_file_keeps_its_keys_while_the_file_is_missing_or_empty(tmp_path: Path) -> None:
    path, clock = tmp_path / "secret", Clock()
    _swap(path, "old-key\n")
    keys = KeyFile(path, check_every=0.0, clock=clock)
    path.unlink()
    assert keys.accepted_text() == ("old-key",)
    _swap(path, "\n")
    assert keys.accepted_text() == ("old-key",)
    _swap(path, "new-key\n")
    assert keys.accepted_text() == ("new-key",)


def test_key_file_needs_a_key_to_start(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no key"):
        KeyFile(path)
    with pytest.raises(OSError):
        KeyFile(tmp_path / "missing")


def test_a_reload_the_caller_refuses_keeps_the_last_keys(tmp_path: Path) -> None:
    """The sidecar's handshake keys (`valid`: no key under 16 bytes): a weak key written by
    mistake is not taken; the next good file is. `secret()` is every key, one per line."""
    path, clock = tmp_path / "secret", Clock()
    good, new = "g" * 16, "n" * 16
    _swap(path, good + "\n")
    keys = KeyFile(path, check_every=1.0, clock=clock, valid=lambda ks: not short_keys(ks))
    _swap(path, f"short\n{good}\n")
    clock.now = 2.0
    assert keys.accepted_text() == (good,)
    _swap(path, f"{new}\n{good}\n")
    clock.now = 4.0
    assert keys.secret() == f"{new}\n{good}".encode()
