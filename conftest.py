"""pytest's root configuration, read by `make test` (tests/ and `--nbmake notebooks`) and by any pytest run here.

The notebook executor's lost wake-up (jupyter/nbclient#312): while a cell displays ipywidgets, nbclient waits for
the cell's reply with one `poll` of the kernel's shell socket for the whole cell timeout, and pyzmq's asyncio
poller can miss the event when a widget's comm message is sent on the same socket meanwhile. The reply is then in
the socket, the kernel idle, and the wait lasts until the timeout (seen here on notebook 03's widget cell: 3600 s,
the timeout the suite sets so that load never fails a cell). Polling in steps of at most a second re-checks the
socket each step (a pyzmq poll that times out reads the socket's state), so a missed wake-up costs a second. The
overall timeout is unchanged. Imports jupyter_client only.
"""

from __future__ import annotations

import time
from queue import Empty

from jupyter_client.channels import AsyncZMQSocketChannel

POLL_STEP_S = 1.0
_get_msg = AsyncZMQSocketChannel.get_msg


async def _get_msg_in_steps(self, timeout: float | None = None):
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await _get_msg(self, POLL_STEP_S if left is None else min(POLL_STEP_S, left))
        except Empty:
            if left is not None and left <= POLL_STEP_S:
                raise


AsyncZMQSocketChannel.get_msg = _get_msg_in_steps
