"""The baselines' job: a plain module-level function (no Django, no Operation row)."""


def noop():
    return {"ok": True}
