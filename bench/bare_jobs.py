"""The baseline's job: a plain module-level function, run by a plain `rq worker` (no Django, no Operation row)."""


def noop():
    return {"ok": True}
