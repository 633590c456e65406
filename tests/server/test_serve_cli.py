"""``latentkit serve``'s refusals, before any model is loaded or port bound."""

from __future__ import annotations

import sys

import pytest
from conftest import run_cli

from latentkit.server import cli as server_cli


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_a_non_loopback_bind_without_a_token_is_refused(capsys, monkeypatch, host):
    monkeypatch.setattr(server_cli, "load_models", _must_not_load)
    code, _, err = run_cli(capsys, "serve", "--host", host)
    assert code == 2
    assert err.count("\n") == 1 and "--token" in err and host in err


def test_loopback_names_are_loopback():
    assert server_cli.is_loopback("127.0.0.1") and server_cli.is_loopback("::1")
    assert server_cli.is_loopback("localhost")
    assert not server_cli.is_loopback("0.0.0.0")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--queue-size", "0"], "--queue-size must be at least 1"),
        (["--batch-limit", "0"], "--batch-limit must be at least 1"),
        (["--job-timeout", "0"], "--job-timeout must be a positive number of seconds"),
        (["--job-timeout", "nan"], "--job-timeout must be a positive number of seconds"),
        (["--cors", "*"], "--cors takes an origin such as https://example.org"),
        (["--cors", "https://example.org/path"], "(scheme and host, no path, not *)"),
    ],
)
def test_bad_flags_are_refused_before_loading(capsys, monkeypatch, flags, message):
    monkeypatch.setattr(server_cli, "load_models", _must_not_load)
    code, _, err = run_cli(capsys, "serve", *flags)
    assert code == 2 and message in err and err.count("\n") == 1


def test_model_names_are_shipped_names_or_stems(tmp_path):
    assert server_cli.model_name("shapes") == "shapes"
    assert server_cli.model_name(str(tmp_path / "my-model")) == "my-model"
    assert server_cli.model_name(str(tmp_path / "sd15.safetensors")) == "sd15"


def _must_not_load(*args, **kwargs):
    raise AssertionError("models were loaded before the flags were checked")


def test_without_the_serve_extra_it_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    monkeypatch.setattr(server_cli, "load_models", _must_not_load)
    code, _, err = run_cli(capsys, "serve")
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'latentkit[serve]'" in err
