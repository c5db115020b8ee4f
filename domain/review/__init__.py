"""Review jobs: a code review from the tenant's champion adapter on a resident base model.

The prompt itself lives in ``domain.prompting`` (training builds the same prompt).

- ``parse``: the model's answer → summary + findings with line references.
- ``runtime``: the base model kept resident per worker process, adapters in an LRU of PEFT slots.
- ``batcher``: one generation batch for up to N concurrent review jobs, adapters mixed per row.
- ``service``: ``handle_review(spec, ctx)``, the job handler.
"""
