"""Jobs that exist only for tests of the operation machinery (imported by workers in other processes too)."""
import logging
import time

from comfyhub.operations import OperationError, operation_job

logger = logging.getLogger(__name__)


@operation_job("test_steps", label="Test steps")
def steps(report, *, count=3, pause=0.0):
    for number in range(1, count + 1):
        logger.info("step %s of %s", number, count)
        report.progress(100 * number / count, f"step {number}")
        time.sleep(pause)
    return {"steps": count}


@operation_job("test_fail", label="Test failure")
def fail(report, *, expected=False):
    report.log("about to fail")
    if expected:
        raise OperationError("The thing could not be done; fix the input and try again.")
    raise ValueError("unexpected breakage")


@operation_job("test_sleep", label="Test sleep")
def sleep(report, *, seconds=60.0, cooperative=True):
    """Sleeps in small slices; with `cooperative` it checks for cancellation between them."""
    report.log("sleeping")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cooperative:
            report.progress(0, "sleeping")
        time.sleep(0.1)
    return {"slept": seconds}
