"""One declaration per setting: the flag, the `poste up` key and the default are the same thing."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from poste.runtime.command import as_click
from poste.runtime.hostport import parse_hostport
from poste.runtime.settings import _UNSET, COUNT, FLAG, ConfigError, parse_duration
from poste.services.relay.scheduler import Policy
from poste.services.relay.service import policy_of
from poste.services.relay.settings import SETTINGS as RELAY
from poste.stack.config import SECTIONS, keys_of, parse


def _command(service: str) -> click.Command:
    import importlib

    module = importlib.import_module(f"poste.services.{service}.command")
    command = module.main
    assert isinstance(command, click.Command)
    return command


@pytest.mark.parametrize("service", list(SECTIONS))
def test_flags_and_keys_come_from_the_declaration(service: str) -> None:
    flags = {opt for p in _command(service).params for opt in p.opts if opt.startswith("--")}
    declared = SECTIONS[service]
    assert flags == {f"--{s.key}" for s in declared if s.cli}
    keys = set(keys_of(service))
    assert {s.key for s in declared if s.stack} <= keys
    # a flag's default, as the command gets it, is the one a key gets
    for p in _command(service).params:
        setting = next(s for s in declared if s.name == p.name)
        if setting.kind not in (FLAG, COUNT) and setting.default is not None \
                and setting.stack_default is _UNSET:
            given = p.type_cast_value(click.Context(_command(service)), p.default)
            assert given == setting.initial(stack=True), setting.key


def test_relay_defaults_are_the_schedulers() -> None:
    values = {s.key: s.initial() for s in RELAY}
    assert policy_of(values) == Policy()


def test_each_worker_paces_at_its_share_of_the_relays_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    """N workers each hold back at 50/N waiting mails, so the relay's spool as a whole
    stays where one process kept it (issue 16: two workers at 50 each reached 122)."""
    values = {s.key: s.initial() for s in RELAY}
    monkeypatch.setenv("POSTE_WORKER", "1/2")
    assert policy_of(values).inflow_backlog == 25
    monkeypatch.setenv("POSTE_WORKER", "0/1")
    assert policy_of(values).inflow_backlog == Policy().inflow_backlog == 50


def test_one_duration_syntax() -> None:
    assert [parse_duration(v) for v in ("200ms", "30s", "5m", "4h", "5d", 7)] == [
        0.2, 30.0, 300.0, 14400.0, 432000.0, 7.0]
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration("soon")


def test_a_builder_error_said_as_a_flag_and_as_a_key() -> None:
    exc = ConfigError("listen", "bad port in 'x:99999'")
    flag = as_click(exc)
    assert isinstance(flag, click.BadParameter)
    assert flag.format_message() == "Invalid value for '--listen': bad port in 'x:99999'"
    cfg = parse({"relay": {}})
    assert str(cfg["relay"].error(exc)) == "[relay] listen: bad port in 'x:99999'"
    pair = ConfigError(None, "{0} and {1} go together", names=("tls-cert", "tls-key"))
    assert isinstance(as_click(pair), click.UsageError)
    assert as_click(pair).format_message() == "--tls-cert and --tls-key go together"
    assert str(cfg["verifier"].error(pair)) == "[verifier] tls-cert and tls-key go together"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"relay": {"domain-concurrency": 0}}, "[relay] `domain-concurrency`: 0 is not in the"
                                                " range 1<=x<=1000"),
        ({"spamfilter": {"ham-cutoff": 1.5}}, "1.5 is not in the range 0.0<=x<=1.0"),
        ({"submission": {"auth-concurrency": 0}}, "0 is not in the range x>=1"),
        ({"submission": {"poll-interval": 5}},
         "[submission] `poll-interval` is not read by `poste up`"),
        ({"relay": {"mailbox": 3}}, "[relay] `mailbox`: expected a path"),
    ],
)
def test_keys_are_checked_as_their_flags(tmp_path: Path, data: dict[str, object],
                                         needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(data, tmp_path / "poste.toml")
    assert needle in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:25", ("127.0.0.1", 25)), ("[::1]:2525", ("::1", 2525)), ("mx.test", ("mx.test", 25)),
    ("unix:/run/poste/relay.sock", ("/run/poste/relay.sock", 0)),
])
def test_hostport_forms(text: str, want: tuple[str, int]) -> None:
    assert parse_hostport(text, 25, "listen") == want


@pytest.mark.parametrize("text", ["unix:relay.sock", "unix:", "x:99999", "[::1"])
def test_hostport_refusals_name_the_setting(text: str) -> None:
    with pytest.raises(ConfigError) as got:
        parse_hostport(text, 25, "destination")
    assert got.value.key == "destination"
