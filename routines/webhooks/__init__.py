"""Webhook triggers: signed deliveries start runs, deduplicated, filtered and debounced.

``signatures`` verifies the two schemes, ``events`` evaluates ``when`` and fills ``{{event.*}}``
placeholders, ``intake`` turns one verified delivery into a run through the same write-then-send path
as every other run.
"""
