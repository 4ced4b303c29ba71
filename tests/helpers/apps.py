"""Apps for tests that need a misbehaving App in a real node process."""

from __future__ import annotations

import os
import time

from workers.kv import KV


class WedgingKV(KV):
    """workers.kv, except that ``("set", "wedge", PATH)`` blocks the apply
    until PATH exists (at most 60 s): an App stuck in a long computation."""

    def apply(self, cmds: list) -> list[int]:
        for cmd in cmds:
            if cmd[0] == "set" and cmd[1] == "wedge":
                deadline = time.monotonic() + 60
                while not os.path.exists(cmd[2]) and time.monotonic() < deadline:
                    time.sleep(0.01)  # polling a file: the test releases us
        return super().apply(cmds)
