"""Waiting, inside one operation, for the operations it queued for other nodes' agents (its sub-operations): until
each ends, or its node's agent goes away before it does. Used by a move's steps (instances.moves) and by work split
over nodes (instances.fanout)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Hashable

from comfyhub import operations
from comfyhub.models import Operation
from comfyhub.operations import OperationError

from .models import Node


@dataclass
class Ended:
    """How a sub-operation stopped being waited for."""

    operation: Operation  # as it was queued
    row: Operation | None  # as it is now; None when it was deleted while it ran
    refusal: str = ""  # why its node takes no jobs now, when its agent went away before it ended ("" otherwise)
    cancelled: bool = False  # the wait cancelled it, its agent having gone away


def wait(report, pending: dict[Hashable, tuple[Node, Operation]], *, poll_seconds: float, cancel_running: bool,
         cancellable: bool = True) -> dict[Hashable, Ended]:
    """Wait for each of `pending` ({key: (its node, its operation)}); returns {key: Ended} in the order they ended.

    While `cancellable`, every poll first looks whether the waiting operation was cancelled (report.check_cancelled
    raises OperationCancelled; cancelling the sub-operations then is the caller's, which knows what else it started).
    When a node's agent goes away, a sub-operation still queued there is cancelled (no agent will take it) and one
    that cannot be (it started or ended meanwhile) is looked at again; with `cancel_running`, one that runs there is
    cancelled too and the wait for it ends either way, else it is left to end as it will."""
    pending, ended = dict(pending), {}
    while pending:
        if cancellable:
            report.check_cancelled()
        rows = {str(row.pk): row for row in Operation.objects.filter(pk__in=[op.pk for _, op in pending.values()])}
        for key, (node, operation) in list(pending.items()):
            row = rows.get(str(operation.pk))
            if row is None or row.is_terminal:
                ended[key] = Ended(operation, row)
                del pending[key]
                continue
            node.refresh_from_db(fields=["approved", "last_heartbeat_at", "online_since"])
            refusal = node.refusal()
            if not refusal:
                continue
            cancelled = False
            if cancel_running or row.status == Operation.Status.QUEUED:
                try:
                    operations.operation_cancel(operation=row)
                    cancelled = True
                except OperationError:
                    if not cancel_running:
                        continue  # it started or ended meanwhile: look again
            ended[key] = Ended(operation, row, refusal, cancelled)
            del pending[key]
        if pending:
            time.sleep(poll_seconds)
    return ended
