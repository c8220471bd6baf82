"""``python -m trio_mailer``: the same as the ``trio-mailer`` command."""

from trio_mailer.cli import main_entry

main_entry()
