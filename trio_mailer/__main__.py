"""``python -m trio_mailer``: the same as the ``trio-mailer`` command."""

from .cli import main_entry

main_entry()
