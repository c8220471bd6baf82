"""How long the sender waits before reconnecting to the relay.

Pure. The delay grows with the number of consecutive session failures (a failed connect, or a
session lost while sending) so that a relay that is down is not hammered, and it is zero after a
success so that an idle session the relay dropped is replaced at once.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class ReconnectBackoff:
    """Doubling delay, from ``base_s`` after the first failure up to ``cap_s``."""

    base_s: float = 0.5
    cap_s: float = 30.0

    def delay_s(self, consecutive_failures: int) -> float:
        """Seconds to wait before the next connect after ``consecutive_failures`` failures."""
        if consecutive_failures <= 0:
            return 0.0
        # Cap the exponent too: 2.0 ** 2000 overflows a float.
        exponent = min(consecutive_failures - 1, 64)
        return float(min(self.cap_s, self.base_s * 2.0**exponent))


# A mail whose every send loses the session (a relay that drops the connection at DATA, say) is
# reported as failed after this many attempts instead of being retried forever.
MAX_SEND_ATTEMPTS = 5
