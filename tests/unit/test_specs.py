import json
from pathlib import Path

import pytest

from domain.errors import InvalidJob
from domain.kinds import SPECS, json_schema, parse_spec

VALID = {
    "review": {"code": "def f():\n    return 1\n", "tenant": "acme"},
    "retrain": {"tenant": "acme", "max_steps": 10},
    "quantize": {"method": "NF4"},
    "distill": {"student_layers": 2},
    "index": {"documents": [{"id": "a", "text": "hello"}]},
    "noop": {},
}


@pytest.mark.parametrize("kind", list(VALID))
def test_valid_bodies_parse(kind):
    spec = parse_spec(kind, VALID[kind])
    assert spec.kind == kind
    assert 0 <= spec.priority <= 9


@pytest.mark.parametrize("kind,body,field", [
    ("review", {"code": ""}, "code"),
    ("review", {"code": "   \n"}, "code"),
    ("review", {"code": "ab\x00cd"}, "code"),
    ("review", {}, "code"),
    ("review", {"code": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ("review", {"code": "x", "colour": "red"}, "colour"),
    ("review", {"code": "x", "tenant": "Bad Tenant!"}, "tenant"),
    ("review", {"code": "x", "priority": 10}, "priority"),
    ("quantize", {"method": "gptq"}, "method"),
    ("retrain", {"learning_rate": -1}, "learning_rate"),
    ("distill", {"alpha": 1.5}, "alpha"),
    ("index", {"action": "add"}, "(message)"),
    ("index", {"action": "remove"}, "(message)"),
    ("index", {"documents": [{"id": "a", "text": ""}]}, "documents.0.text"),
    ("noop", {"sleep_s": "soon"}, "sleep_s"),
])
def test_malformed_bodies_name_the_field(kind, body, field):
    with pytest.raises(InvalidJob) as err:
        parse_spec(kind, body)
    assert err.value.field == field
    assert field.split(".")[0] in str(err.value) or field == "(message)"


def test_non_object_and_bad_json_are_rejected():
    with pytest.raises(InvalidJob, match="JSON object"):
        parse_spec("review", [1, 2])
    with pytest.raises(InvalidJob, match="not valid JSON"):
        parse_spec("review", "{nope")
    assert parse_spec("review", json.dumps(VALID["review"])).tenant == "acme"


def test_unknown_kind():
    with pytest.raises(InvalidJob, match="unknown job kind"):
        parse_spec("train", {})


def test_quantize_error_names_supported_methods():
    with pytest.raises(InvalidJob, match="nf4, fp4, int8"):
        parse_spec("quantize", {"method": "awq"})


@pytest.mark.parametrize("kind", list(SPECS))
def test_published_json_schemas_match_the_models(kind):
    """docs/schemas/<kind>.json is what other-language producers read: it must not drift from the code."""
    published = Path(__file__).resolve().parents[2] / "docs" / "schemas" / f"{kind}.json"
    assert json.loads(published.read_text()) == json_schema(kind), f"regenerate with: foundry schema {kind} > {published}"


def test_schema_validates_real_messages():
    jsonschema = pytest.importorskip("jsonschema")
    for kind, body in VALID.items():
        jsonschema.validate(body, json_schema(kind))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"code": "x", "colour": 1}, json_schema("review"))
