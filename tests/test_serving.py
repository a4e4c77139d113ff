"""What decides that a process serves: gunicorn's hook, or an explicit word; never its name."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from embeddings.apps import serves_without_gunicorn
from embedplatform import serving


@pytest.mark.parametrize(
    "argv",
    [
        ["/srv/.venv/bin/gunicorn", "-c", "embedplatform/gunicorn.conf.py"],
        ["manage.py", "migrate"],
        ["manage.py", "check", "--deploy"],
        ["manage.py", "runserver"],  # the autoreloader's parent only watches files
        ["/usr/bin/pytest"],
    ],
)
def test_it_does_not_start_serving_from_a_program_name(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBEDPLATFORM_SERVING", raising=False)
    monkeypatch.delenv("RUN_MAIN", raising=False)
    assert not serves_without_gunicorn(argv)


def test_it_serves_when_told_so_or_as_runservers_serving_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUN_MAIN", raising=False)
    assert serves_without_gunicorn(["manage.py", "runserver", "--noreload"])
    monkeypatch.setenv("RUN_MAIN", "true")
    assert serves_without_gunicorn(["manage.py", "runserver"])
    monkeypatch.delenv("RUN_MAIN")
    monkeypatch.setenv("EMBEDPLATFORM_SERVING", "1")
    assert serves_without_gunicorn(["waitress-serve", "embedplatform.wsgi:application"])


def test_it_starts_a_serving_process_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, settings: Any
) -> None:
    monkeypatch.setattr(serving, "_started", False)
    settings.MODEL_LOAD_ON_START = False
    with caplog.at_level(logging.INFO):
        serving.start_serving_process()
        serving.start_serving_process()
    assert [r.getMessage() for r in caplog.records].count("token_id_input_mode") == 1
