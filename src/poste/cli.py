"""The one entry point, `poste`, with lazily imported subcommands.

Subcommands are imported only when run, so `poste --help` and the small tools
start fast and a service's heavy dependencies are not loaded by another.
"""

from __future__ import annotations

import importlib
import sys

import click
from click.exceptions import NoArgsIsHelpError

# name -> "module:attribute" of a click command or group
COMMANDS: dict[str, tuple[str, str]] = {
    # the blaze-style tools
    "make": ("poste.tools.make_cli:main", "Build a mail from a body on stdin."),
    "send": ("poste.tools.send_cli:main", "Send a mail to an SMTP server (STARTTLS when offered)."),
    "submit": ("poste.tools.send_cli:submit", "Submit a mail with AUTH (465 TLS or 587 STARTTLS)."),
    "srv": ("poste.tools.srv_cli:main", "Receive N mails and write them as received."),
    "spf": ("poste.services.verifier.spf_cli:main", "SPF tools: check."),
    "dkim": ("poste.dkim.cli:main", "DKIM tools: keygen, sign, verify, rotate."),
    "cert": ("poste.certs.cli:main", "ACME certificates by DNS-01: issue, renew, show."),
    "arc": ("poste.dkim.arc_cli:main", "ARC tools: sign (seal), verify."),
    "dmarc": ("poste.services.verifier.dmarc_cli:main", "DMARC tools: check a mail file."),
    "dns": ("poste.dns.cli:main", "DNS records a domain needs; publish them (RFC 2136)."),
    "spam": ("poste.spam.cli:main", "Spam filter tools: train, classify, mark, eval."),
    "users": ("poste.users.cli:main", "Manage the Git users repository."),
    "queue": ("poste.services.relay.queue_cli:main", "Inspect and manage the relay's spool."),
    "tls-report": ("poste.services.relay.tls_report_cli:main",
                   "Send the TLS-RPT reports of outbound sessions (RFC 8460)."),
    "quarantine": ("poste.services.relay.quarantine_cli:main",
                   "Held spam: list, show, release, delete; digest --now."),
    # the services
    "forward": ("poste.services.forward.command:main", "Pass mail on to the next hop (adds Received:)."),
    "verifier": ("poste.services.verifier.command:main", "The public MX: SPF, DKIM, DMARC labels."),
    "spamfilter": ("poste.services.spamfilter.command:main", "Label mail with X-Spamtacus."),
    "relay": ("poste.services.relay.command:main", "Deliver to targets and MX, with a durable queue."),
    "submission": ("poste.services.submission.command:main", "Authenticated submission, 465 and 587."),
    "signer": ("poste.services.signer.command:main", "DKIM-sign outgoing mail."),
    # the whole stack
    "init": ("poste.stack.init_cli:main", "Write a working configuration for a domain."),
    "up": ("poste.stack.up_cli:main", "Run all services in one process (a demo with no config)."),
    "doctor": ("poste.stack.doctor_cli:main", "Check a domain's DNS and TLS from the outside."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        target, _ = entry
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                return _missing(cmd_name)
            raise
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help without importing every module.
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _missing(name: str) -> click.Command:
    @click.command(name=name, help="Not built yet.")
    def stub() -> None:
        raise click.ClickException(f"'poste {name}' is not available in this build")

    return stub


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="poste")
def cli() -> None:
    """poste: own the mail of your domain."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; errors are one line on stderr, never a traceback or a usage dump."""
    try:
        cli.main(args=argv, prog_name="poste", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # `poste queue` alone: the help is the answer
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        message = " ".join(exc.format_message().split())
        click.echo(f"Error: {message}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("Aborted.", err=True)
        sys.exit(130)
