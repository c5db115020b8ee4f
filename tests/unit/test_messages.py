"""What Foundry's producer puts on the wire (no broker needed: messages are built, not sent)."""

from __future__ import annotations

import json

from domain.config import Settings
from worker.celery_app import REPR_MAX, make_celery


def _message(app, args, kwargs=None):
    return app.amqp.create_task_message("job-1", "foundry.noop", args, kwargs or {})


def test_task_event_arguments_are_the_body_as_json(tmp_path):
    app = make_celery(Settings(data_dir=tmp_path))
    body = {"tenant": "acme", "code": "print('é')", "crash": None, "sleep_s": 0.5}
    msg = app.amqp.create_task_message("job-1", "foundry.noop", [body], {}, create_sent_event=True)
    assert json.loads(msg.headers["argsrepr"]) == [body]
    assert msg.headers["kwargsrepr"] == "{}"
    assert msg.sent_event["args"] == msg.headers["argsrepr"]  # what the task-sent event (Flower) shows
    # the message itself is unchanged: the body as given, JSON
    assert msg.body[0] == [body]


def test_long_bodies_are_cut_at_celerys_limit(tmp_path):
    app = make_celery(Settings(data_dir=tmp_path))
    msg = _message(app, [{"tenant": "acme", "code": "x = 1\n" * 5000}], {"note": "y" * 5000})
    assert len(msg.headers["argsrepr"]) == REPR_MAX and msg.headers["argsrepr"].endswith("...")
    assert len(msg.headers["kwargsrepr"]) == REPR_MAX
    assert len(msg.body[0][0]["code"]) == 30000  # only the text shown in events is cut


def test_an_explicit_argsrepr_wins(tmp_path):
    """Callers that hide arguments (Celery's argsrepr option) still can."""
    app = make_celery(Settings(data_dir=tmp_path))
    msg = app.amqp.create_task_message("job-1", "foundry.noop", [{"secret": "s"}], {}, argsrepr="(hidden)")
    assert msg.headers["argsrepr"] == "(hidden)"
