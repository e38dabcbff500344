"""`python manage.py chat`: the terminal chat (chatbot_api.cli) against this site's server."""

import argparse
import os
import sys

from django.core.management.base import BaseCommand
from django.urls import reverse

from chatbot_api import cli


class Command(BaseCommand):
    help = (
        "Chat in the terminal with a running server (default: this site on 127.0.0.1:8000). "
        "Ctrl-C stops an answer; a second Ctrl-C or Ctrl-D quits."
    )
    requires_system_checks = []  # a client: the server it talks to has its own configuration

    def add_arguments(self, parser):
        cli.add_arguments(parser)
        # This site knows where it put the chat: the default URL follows its prefix.
        local = f"http://127.0.0.1:8000{reverse('chatbot:chat')}"
        parser.set_defaults(url=os.environ.get("CHATBOT_URL", local))

    def handle(self, *args, **options):
        status = cli.run(argparse.Namespace(**options), out=sys.stdout)
        if status:
            sys.exit(status)
