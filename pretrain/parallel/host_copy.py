"""Reading a few device numbers without waiting for the work queued after them.

`tensor.tolist()` on a GPU waits for everything queued on the stream, including kernels
launched after the numbers were computed. A `HostCopy` queues the copy into pinned host
memory where it is made and records an event behind it; `tolist()` then waits for that event
only, so kernels launched in between (the optimizer step) keep the GPU busy while the host
reads and prepares the next step. On the CPU the numbers are already there.
"""

from __future__ import annotations

import torch


class HostCopy:
    """A copy of `values` on the host, started now and waited for in `tolist`."""

    def __init__(self, values: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            # Behind the copy: on the stream of the values' device, which the copy runs on (a
            # single-process run on cuda:1 leaves cuda:0 the current device).
            self._event.record(torch.cuda.current_stream(values.device))
        else:
            self._host = values.detach()

    def tensor(self) -> torch.Tensor:
        """The host copy, once it has arrived."""
        if self._event is not None:
            self._event.synchronize()
        return self._host

    def tolist(self) -> list[float]:
        return self.tensor().tolist()
