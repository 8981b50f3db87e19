"""Readiness waits (a child's /health, Redis answering, a replica in sync), polled with tenacity."""

import operator
from collections.abc import Callable

from tenacity import Retrying, retry_if_exception_type, retry_if_result, stop_after_delay, wait_fixed


def wait_until(condition: Callable[[], object], timeout_s: float, interval_s: float = 0.05,
               retry_on: tuple[type[BaseException], ...] = (),
               give_up: Callable[[], bool] = lambda: False) -> bool:
    """Call `condition` every `interval_s` until it is truthy (True), `timeout_s` has passed or
    `give_up()` says waiting is pointless (False). Exceptions of `retry_on` count as not yet; any
    other exception propagates. The last call is made at or after the deadline."""
    retrying = Retrying(stop=stop_after_delay(timeout_s) | (lambda _: give_up()), wait=wait_fixed(interval_s),
                        retry=retry_if_result(operator.not_) | retry_if_exception_type(retry_on),
                        retry_error_callback=lambda _: False)
    return bool(retrying(condition))
