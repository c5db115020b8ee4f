"""The adapter lifecycle: feedback → training data → LoRA training → eval gate → versions and aliases.

- ``store``: adapter versions, aliases and their history in the ledger; files under the data root.
- ``data``: the training set built from a tenant's feedback (deduplicated, hashed).
- ``training``: the LoRA training loop (packing, completion-only loss, checkpoints, resume).
- ``gate``: candidate vs champion (or base) on held-out feedback; promote or keep.
- ``retrain``: the ``retrain`` job handler.
- ``merge``: combine versions with PEFT ``add_weighted_adapter``.
- ``cron`` / ``schedule``: per-tenant retraining schedules evaluated by the beat.
"""
