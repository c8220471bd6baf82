"""Load shedding: under a flood of calls while the queue is full, delivery comes first.

Pure; times are plain floats on the caller's monotonic clock.

Theory of operation. The service has one thread and one scheduler for everything: the sender
that delivers the queued mail and the handlers that answer callers. A refusal ("queue full") is
cheap, but not free (HTTP/2 decoding, a task, an encoded answer: about half a millisecond), and
a flood of callers that retry at once would spend the whole loop on refusals while the queue
waits for the sender. So a send call that finds the queue full does not hear so at once: it
waits its turn, and the turns are ``per_s`` a second (``RefusalPacer.turn_s``). Callers that
answer the refusal by calling again (a closed loop: every real client, and the flood of
``bench/overload.py``) are thereby slowed to ``per_s`` calls a second altogether, and the loop
stays free for delivery. A call whose turn would come after its ``latest_s`` (its wait bound or
its deadline) is answered at ``latest_s`` and takes no turn, so the wait never exceeds either
and a slow refusal is never turned into a missed deadline. A waiting call is accepted instead
when the senders free a place meanwhile (``MailerService`` lets one waiter at a time watch the
queue), so the pacing never holds acceptance below the delivery rate. Slowing callers by
holding their calls costs a stream each, which the HTTP/2 limits bound (streams per
connection, connections).
"""

from __future__ import annotations

import math

import attrs

# Queue-full refusals answered per second while the queue stays full (MAILER_REFUSALS_PER_S).
REFUSALS_PER_S = 100.0
# The longest a send call waits for its turn to be refused (MAILER_REFUSAL_WAIT_S).
REFUSAL_WAIT_S = 1.0
# A call with a deadline is answered this long before it, so the answer arrives in time.
DEADLINE_MARGIN_S = 0.05


@attrs.define
class RefusalPacer:
    """Turns for queue-full refusals: at most ``per_s`` a second, in order of arrival.

    ``per_s`` of 0 or less turns pacing off: every refusal at once.
    """

    per_s: float = REFUSALS_PER_S
    _next_s: float = -math.inf  # the earliest free turn

    def turn_s(self, now_s: float, latest_s: float) -> float:
        """When a refusal arriving at ``now_s`` is answered: the next free turn if it comes by
        ``latest_s`` (the turn is then taken), else ``latest_s`` itself (no turn taken); never
        before ``now_s``."""
        if self.per_s <= 0 or latest_s <= now_s:
            return now_s
        turn = max(now_s, self._next_s)
        if turn > latest_s:
            return latest_s
        self._next_s = turn + 1.0 / self.per_s
        return turn
