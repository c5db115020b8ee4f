import io
import json
import logging

from domain.logs import ContextFilter, JsonFormatter, bind, configure, job_context, mask_secrets


def test_urls_lose_their_passwords():
    assert mask_secrets("postgresql+psycopg://foundry:s3cret@db:5432/foundry") == "postgresql+psycopg://foundry:***@db:5432/foundry"
    assert mask_secrets("redis://:hunter2@redis:6379/0 and redis://redis:6379/0") == "redis://:***@redis:6379/0 and redis://redis:6379/0"


def _logger(json_logs):
    stream = io.StringIO()
    logger = logging.getLogger(f"t{json_logs}")
    logger.handlers = [logging.StreamHandler(stream)]
    logger.setLevel(logging.INFO)
    configure(logger, json_logs)
    return logger, stream


def test_json_lines_carry_job_and_tenant():
    logger, stream = _logger(True)
    with job_context(job_id="j1", kind="review"):
        bind(tenant="acme")
        logger.info("connecting to %s", "redis://:pw@h:6379/0")
    rec = json.loads(stream.getvalue())
    assert (rec["job_id"], rec["kind"], rec["tenant"]) == ("j1", "review", "acme")
    assert "pw" not in rec["message"] and ":***@" in rec["message"]


def test_text_lines_carry_job_outside_a_job_too():
    logger, stream = _logger(False)
    logger.warning("idle")
    with job_context(job_id="j2", tenant="beta"):
        logger.warning("busy")
    lines = stream.getvalue().splitlines()
    assert "job=- tenant=-" in lines[0] and "job=j2 tenant=beta" in lines[1]
    assert isinstance(logger.handlers[0].filters[0], ContextFilter)
    assert not isinstance(logger.handlers[0].formatter, JsonFormatter)


def test_mapping_style_arguments_still_format():
    """Celery logs 'Task %(name)s[%(id)s] received' with a dict of arguments."""
    logger, stream = _logger(False)
    logger.info("Task %(name)s[%(id)s] received", {"name": "foundry.noop", "id": "abc"})
    assert "Task foundry.noop[abc] received" in stream.getvalue()
