"""Job specs: the validated body of each job message, one model per kind.

A message is the JSON object sent as the single positional argument of the Celery task
``foundry.<kind>`` (see docs/messages.md). Unknown fields are refused, so a typo is reported
instead of silently ignored. ``domain.kinds.parse_spec`` turns any validation failure into ``InvalidJob``
whose message names the offending field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from domain.errors import InvalidJob

TenantId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="Tenant id (lowercase letters, digits, _ . -).")]
AdapterRef = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:/-]+$",
                                  description="An alias (champion, candidate, ...) or an adapter version id.")]


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    tenant: TenantId = "default"
    idempotency_key: str | None = Field(None, min_length=1, max_length=200,
                                        description="Same key + tenant + kind = same job: a repeat enqueue returns the first job.")
    priority: int = Field(5, ge=0, le=9, description="0 = lowest, 9 = highest.")


class ReviewSpec(JobSpec):
    kind: Literal["review"] = "review"
    code: str = Field(..., description="Source code or a unified diff to review.")
    path: str | None = Field(None, max_length=1000, description="File path, for the prompt and the language guess.")
    language: str | None = Field(None, max_length=32)
    is_diff: bool = Field(False, description="The code is a unified diff.")
    adapter: AdapterRef | None = Field(None, description="Adapter to use; default: the tenant's champion (or the base model if none).")
    max_new_tokens: int = Field(256, ge=1, le=4096)
    use_retrieval: bool = True

    @field_validator("code")
    @classmethod
    def _code_is_text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("code is empty")
        if "\x00" in v:
            raise ValueError("code contains NUL bytes: binary content cannot be reviewed")
        return v


class RetrainSpec(JobSpec):
    kind: Literal["retrain"] = "retrain"
    adapter_name: str = Field("reviewer", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    base_model: str | None = Field(None, description="Base model id/path; default: the deployment's base model.")
    min_feedback: int = Field(1, ge=1, description="Fewer new feedback items than this: nothing to train.")
    lora_r: int = Field(16, ge=1, le=256)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    max_steps: int = Field(200, ge=1, le=1_000_000)
    batch_size: int = Field(4, ge=1, le=1024)
    max_seq_len: int = Field(512, ge=16, le=32768)
    packing: bool = True
    qlora: bool = False
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    promotion_margin: float = Field(0.01, ge=0, description="Relative eval-loss improvement needed to promote.")
    quality_reviews: int = Field(8, ge=0, le=200, description="Held-out feedback files both sides of the eval gate "
                                 "review for its precision measure (domain/adapters/gate.py); 0: loss and accuracy only.")
    quality_max_new_tokens: int = Field(128, ge=16, le=4096, description="Output budget of those reviews.")
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    procs: int | None = Field(None, ge=1, le=64, description="Training processes (torch.distributed); default FOUNDRY_TRAIN_PROCS.")


QUANT_METHODS = ("nf4", "fp4", "int8")


class QuantizeSpec(JobSpec):
    kind: Literal["quantize"] = "quantize"
    source_model: str | None = Field(None, description="Model id/path; default: the deployment's base model.")
    adapter: AdapterRef | None = Field(None, description="Merge this adapter into the source (in float) before quantizing.")
    method: str = Field("nf4", description="nf4 | fp4 | int8 (bitsandbytes).")
    double_quant: bool = True
    eval_max_tokens: int = Field(4096, ge=64, le=1_000_000, description="Held-out tokens for the quality report.")
    eval_data_path: str | None = Field(None, max_length=1000, description="Held-out text for the report: a file or folder "
                                       "under the data root; default: the standard library's held-out split (docs/quantization.md).")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v.lower() not in QUANT_METHODS:
            raise ValueError(f"unsupported quantization method {v!r}; supported here: {', '.join(QUANT_METHODS)}")
        return v.lower()


class DistillSpec(JobSpec):
    kind: Literal["distill"] = "distill"
    teacher: str | None = Field(None, description="Teacher model id/path; default: the deployment's base model.")
    student: str | None = Field(None, description="Student config/path; default: the teacher with fewer layers.")
    student_layers: int | None = Field(None, ge=1, description="Layers kept from the teacher (default: half).")
    layer_selection: Literal["greedy", "block", "even"] = Field(
        "greedy", description="Which teacher layers the student keeps: 'greedy' removes layers one at a time, each time "
        "the one whose removal raises the loss on the first training blocks least (the last layer is kept); 'block' "
        "drops the run of consecutive layers that changes the hidden state least (angular distance; cheaper); 'even' "
        "keeps evenly spaced ones.")
    kept_layers: list[int] | None = Field(
        None, min_length=1, description="The teacher layers the student keeps (0-based, increasing); overrides "
        "layer_selection, e.g. to reproduce an earlier student.")
    temperature: float = Field(2.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1)
    max_steps: int = Field(200, ge=1, le=1_000_000)
    token_budget: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=16, le=32768)
    learning_rate: float = Field(5e-4, gt=0, lt=1)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    data_path: str | None = Field(None, max_length=1000, description="Training text: a file or folder under the data root; "
                                  "default: the standard library's train split (docs/quantization.md).")
    eval_data_path: str | None = Field(None, max_length=1000, description="Held-out text for the report; default: the "
                                       "standard library's held-out split.")
    eval_max_tokens: int = Field(4096, ge=64, le=1_000_000, description="Held-out tokens for the quality report.")
    procs: int | None = Field(None, ge=1, le=64, description="Training processes (torch.distributed); default FOUNDRY_TRAIN_PROCS.")
    strategy: Literal["ddp", "fsdp"] | None = Field(
        None, description="How the processes share the models: 'ddp' (each holds all of both) or 'fsdp' (the "
        "student's weights, gradients and optimizer states and the teacher's weights sharded over them); default "
        "FOUNDRY_TRAIN_STRATEGY.")

    @field_validator("kept_layers")
    @classmethod
    def _kept_layers(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if v is None:
            return v
        if any(i < 0 for i in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must be increasing layer indices (0-based, no repeats)")
        count = info.data.get("student_layers")
        if count is not None and len(v) != count:
            raise ValueError(f"{len(v)} layers listed but student_layers is {count}")
        return v


class IndexDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1, max_length=500)
    text: str
    source: str | None = Field(None, max_length=200, description="review | code | doc | ...")
    language: str | None = Field(None, max_length=32)
    path: str | None = Field(None, max_length=1000)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("document text is empty")
        if "\x00" in v:
            raise ValueError("document text contains NUL bytes: binary content cannot be indexed")
        return v


class IndexSpec(JobSpec):
    kind: Literal["index"] = "index"
    action: Literal["add", "remove", "rebuild"] = "add"
    documents: list[IndexDocument] = Field(default_factory=list)
    document_ids: list[str] = Field(default_factory=list, description="For remove.")
    include_accepted_reviews: bool = Field(False, description="Also index the tenant's accepted reviews.")

    @model_validator(mode="after")
    def _action_needs(self):
        if self.action == "add" and not self.documents and not self.include_accepted_reviews:
            raise ValueError("action 'add' needs documents")
        if self.action == "remove" and not self.document_ids:
            raise ValueError("action 'remove' needs document_ids")
        return self


class NoopSpec(JobSpec):
    """A job that does nothing (benchmarks, smoke tests) or fails on purpose (fault injection)."""

    kind: Literal["noop"] = "noop"
    sleep_s: float = Field(0.0, ge=0, le=3600)
    crash: Literal["exit", "raise", "transient"] | None = Field(None, description="Needs FOUNDRY_ALLOW_FAULT_INJECTION.")
    crash_times: int = Field(1_000_000, ge=0, description="Crash only on the first N attempts.")
    cost_tokens: int = Field(0, ge=0, description="Record this many tokens of usage (tests cost exactly-once).")


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(message)"


def validate_body(model: type[JobSpec], payload: Any) -> JobSpec:
    """Validate a message body against its kind's spec model (``domain.kinds.parse_spec`` picks the model).
    Raises InvalidJob naming the field at fault."""
    kind = model.model_fields["kind"].default
    if isinstance(payload, (str, bytes)):
        try:
            payload = json.loads(payload)
        except ValueError as exc:
            raise InvalidJob(f"(message): not valid JSON: {exc}", field="(message)") from exc
    if not isinstance(payload, dict):
        raise InvalidJob(f"(message): the job body must be a JSON object, got {type(payload).__name__}", field="(message)")
    payload = {k: v for k, v in payload.items() if k != "kind" or v == kind}
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errs = exc.errors()
        first = errs[0]
        field = _field_path(first["loc"])
        msgs = "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in errs[:5])
        raise InvalidJob(msgs, field=field) from None
