"""Broker configuration for the bench: a Mosquitto config that locks each owner channel to its
owner (password file, ACL, optional TLS listener with a bench CA), plus client configs.

``gateway broker-config --out DIR --vin VIN`` writes::

    DIR/mosquitto.conf        listeners, allow_anonymous false, password_file, acl_file
    DIR/passwd                Mosquitto password file ($7$ = PBKDF2-SHA512, as mosquitto_passwd)
    DIR/acl                   who may read and write which topic (nothing else is allowed)
    DIR/secrets/USER.password one random password per user, mode 0600 (never printed)
    DIR/USER.toml             [gateway]+[broker] for `gateway replay/run/owner/consent --config`
    DIR/tls/                  with --tls: ca.crt, ca.key, server.crt, server.key (openssl)
    DIR/data/                 Mosquitto persistence; DIR/mosquitto.log its log

The passwords are hashed here rather than with ``mosquitto_passwd``: ``-b`` would put each
password on a command line (readable by every local user in /proc), and ``-U`` needs them in
clear text in the password file first. The format is the one ``mosquitto_passwd`` writes
(``$7$ITERATIONS$SALT$HASH``); the tests prove a real Mosquitto accepts it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import ipaddress
import os
import pwd
import re
import secrets
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from gateway.benchtls import make_bench_tls, openssl_exe
from gateway.egress.schema import INBOUND, Topics
from gateway.errors import ConfigError

PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$ (Mosquitto 2.0)
SALT_BYTES = 12
_VIN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


def _is_host(text: str) -> bool:
    """A host name, an IPv4 or an IPv6 address (as Mosquitto's ``listener`` takes it)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOST.fullmatch(text))


_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


# -- the pure part: who may do what, and the text of each file -------------------------------
class Role(Enum):
    GATEWAY = "gateway"  # writes its vehicle's channel, reads the owner's inbound topics
    OWNER = "owner"  # reads its vehicle's channel, writes consent/set and command


@dataclass(frozen=True)
class Account:
    """One broker user. ``vin`` is the vehicle whose owner channel it may use."""

    username: str
    vin: str
    role: Role


@dataclass(frozen=True)
class BrokerPlan:
    """What ``gateway broker-config`` writes: the VINs, their owners and the topic prefix."""

    out: Path
    vins: tuple[str, ...]
    owners: tuple[tuple[str, str], ...] = ()  # (name, VIN); default: owner-VIN for each VIN
    prefix: str = "vehicles"
    port: int = 1883
    bind: str = ""  # "" listens on every interface
    tls: bool = False
    tls_port: int = 8883
    tls_only: bool = False
    hostnames: tuple[str, ...] = ()
    days: int = 365
    user: str = ""  # the account Mosquitto switches to when started as root ("": no line)
    accounts: tuple[Account, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if not self.vins:
            raise ConfigError("broker-config needs at least one --vin")
        for vin in self.vins:
            if not _VIN.fullmatch(vin):
                raise ConfigError(
                    f"--vin {vin!r}: use letters, digits, '-' or '_' (no '/', '+', '#', spaces)"
                )
        if len(set(self.vins)) != len(self.vins):
            raise ConfigError("--vin: a VIN is given twice")
        if not _PREFIX.fullmatch(self.prefix):
            raise ConfigError(
                f"--prefix {self.prefix!r}: topic levels of letters, digits, '_', '.', '-' "
                "separated by '/' (no wildcards, no empty level)"
            )
        for name, port in (("--port", self.port), ("--tls-port", self.tls_port)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{name} {port}: must be 1..65535")
        if self.tls and not self.tls_only and self.port == self.tls_port:
            raise ConfigError("--port and --tls-port must differ")
        if self.tls_only and not self.tls:
            raise ConfigError("--tls-only needs --tls")
        for host in (*self.hostnames, *([self.bind] if self.bind else [])):
            if not _is_host(host):
                raise ConfigError(
                    f"{host!r}: not a host name or IP address (an IPv6 address without "
                    "brackets: ::1, not [::1])"
                )
        if self.days < 1:
            raise ConfigError(f"--days {self.days}: must be at least 1")
        owners = self.owners or tuple((f"owner-{v}", v) for v in self.vins)
        accounts = [Account(f"gateway-{v}", v, Role.GATEWAY) for v in self.vins]
        for name, vin in owners:
            if not _NAME.fullmatch(name) or name.startswith("gateway-"):
                raise ConfigError(
                    f"--owner {name}={vin}: a name of letters, digits, '_', '.', '-' "
                    "that does not start with 'gateway-'"
                )
            if vin not in self.vins:
                raise ConfigError(f"--owner {name}={vin}: {vin} is not one of the --vin values")
            accounts.append(Account(name, vin, Role.OWNER))
        names = [a.username for a in accounts]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ConfigError(f"--owner: the name {dup!r} is given twice")
        object.__setattr__(self, "accounts", tuple(accounts))

    @property
    def unowned(self) -> list[str]:
        """The VINs no owner account may read (possible with explicit ``--owner`` values)."""
        owned = {a.vin for a in self.accounts if a.role is Role.OWNER}
        return [v for v in self.vins if v not in owned]

    @property
    def client_host(self) -> str:
        """The host name the client configs use (and the TLS certificate must carry)."""
        if self.hostnames:
            return self.hostnames[0]
        if self.bind and self.bind not in ("0.0.0.0", "::"):
            return self.bind
        return "localhost"

    @property
    def client_url(self) -> str:
        host = f"[{self.client_host}]" if ":" in self.client_host else self.client_host
        if self.tls:
            return f"mqtts://{host}:{self.tls_port}"
        return f"mqtt://{host}:{self.port}"

    def paths(self) -> dict[str, Path]:
        """Every file this plan writes, by role (checked for overwriting before any write)."""
        d = self.out
        p = {"conf": d / "mosquitto.conf", "passwd": d / "passwd", "acl": d / "acl"}
        for a in self.accounts:
            p[f"secret:{a.username}"] = d / "secrets" / f"{a.username}.password"
            p[f"client:{a.username}"] = d / f"{a.username}.toml"
        if self.tls:
            for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
                p[f"tls:{name}"] = d / "tls" / name
        return p


def acl_rules(plan: BrokerPlan) -> list[tuple[str, str, str]]:
    """(username, access, topic) for every grant; Mosquitto denies everything else."""
    rules = []
    for a in plan.accounts:
        t = Topics(plan.prefix, a.vin)
        inbound = [f"{t.base}/{name}" for name in INBOUND]
        if a.role is Role.GATEWAY:
            rules.append((a.username, "write", t.all))
            rules += [(a.username, "read", topic) for topic in inbound]
        else:
            rules.append((a.username, "read", t.all))
            rules += [(a.username, "write", topic) for topic in inbound]
    return rules


def acl_text(plan: BrokerPlan) -> str:
    lines = [
        "# Mosquitto ACL written by `gateway broker-config`. Anything not granted here is denied;",
        "# anonymous clients are refused by mosquitto.conf. Reload with: kill -HUP <mosquitto pid>",
    ]
    current = None
    for user, access, topic in acl_rules(plan):
        if user != current:
            acct = next(a for a in plan.accounts if a.username == user)
            lines += ["", f"# {acct.role.value} of vehicle {acct.vin}", f"user {user}"]
            current = user
        lines.append(f"topic {access} {topic}")
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(plan: BrokerPlan) -> str:
    d = plan.out
    bind = f" {plan.bind}" if plan.bind else ""
    lines = [
        "# Mosquitto 2.x configuration written by `gateway broker-config`.",
        f"# Start: mosquitto -c {d / 'mosquitto.conf'}",
        "# It names files only; the passwords are in secrets/ (mode 0600), hashed in passwd.",
        *([f"user {plan.user}"] if plan.user else []),
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {d / 'passwd'}",
        f"acl_file {d / 'acl'}",
        "persistence true",
        f"persistence_location {d / 'data'}/",
        f"log_dest file {d / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "# PUBACKs leave at once, not held for the ACK of the one before (Nagle): the gateway",
        "# keeps several QoS 1 publishes in flight",
        "set_tcp_nodelay true",
        "",
    ]
    if not plan.tls_only:
        lines += [
            "# plain MQTT: passwords cross the network in clear text; use it on a closed bench",
            f"listener {plan.port}{bind}",
            "",
        ]
    if plan.tls:
        lines += [
            "# MQTT over TLS with the bench CA",
            f"listener {plan.tls_port}{bind}",
            f"cafile {d / 'tls' / 'ca.crt'}",
            f"certfile {d / 'tls' / 'server.crt'}",
            f"keyfile {d / 'tls' / 'server.key'}",
            "tls_version tlsv1.2",
            "",
        ]
    return "\n".join(lines)


def hash_password(
    password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Mosquitto's ``$7$`` hash (PBKDF2-HMAC-SHA512), as ``mosquitto_passwd`` writes it."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True if ``encoded`` (a ``$7$`` entry of a Mosquitto password file) is ``password``."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(want))
    return hmac.compare_digest(got, want)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def client_toml_text(plan: BrokerPlan, account: Account) -> str:
    use = (
        "gateway replay LOG --dbc ... --config"
        if account.role is Role.GATEWAY
        else "gateway owner --config"
    )
    broker = {
        "url": plan.client_url,
        "topic_prefix": plan.prefix,
        "username": account.username,
        "password_file": str(plan.out / "secrets" / f"{account.username}.password"),
    }
    if account.role is Role.GATEWAY:
        broker["client_id"] = account.username
    if plan.tls:
        broker["tls_ca"] = str(plan.out / "tls" / "ca.crt")
    lines = [
        f"# {account.role.value} of vehicle {account.vin}, written by `gateway broker-config`.",
        f"# Use: {use} {plan.out / (account.username + '.toml')}",
        "[gateway]",
        f"vin = {_toml_str(account.vin)}",
    ]
    if account.role is Role.GATEWAY:
        # each vehicle its own record and outbox (beside this file): with the defaults, the
        # gateways of one folder shared them, and one sent the other's summaries, lost
        lines += [
            f"ledger = {_toml_str(account.username + '-ledger.jsonl')}",
            f"outbox = {_toml_str(account.username + '-outbox.sqlite')}",
        ]
    lines += [
        "",
        "[broker]",
        *(f"{k} = {_toml_str(v)}" for k, v in broker.items()),
    ]
    return "\n".join(lines) + "\n"


# -- the shell: files, modes, openssl --------------------------------------------------------
def _write(path: Path, text: str, mode: int) -> None:
    """Write with ``mode`` from the first byte on (a secret is never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file (--force) keeps its old mode otherwise
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def generate(plan: BrokerPlan, *, force: bool = False, new_ca: bool = False) -> dict[str, Path]:
    """Write every file of ``plan``; refuses to overwrite any of them unless ``force``. With
    ``force`` every password and the server certificate are new; the CA only with ``new_ca``;
    and the password and client config of a user the earlier configuration had and this one
    has not are removed (its ``removed:USER`` entries in the result)."""
    files = plan.paths()
    stale = [u for u in _users(plan.out / "passwd") if f"secret:{u}" not in files] if force else []
    if not force:
        for path in files.values():
            if path.exists():
                raise ConfigError(
                    f"{path} exists: refusing to overwrite the broker configuration "
                    "(give --force to replace it, with new passwords)"
                )
    broker_account = _broker_account(plan)
    if plan.tls:
        openssl_exe()  # before anything is written
    try:
        out = plan.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "secrets").mkdir(exist_ok=True)
        os.chmod(out / "secrets", 0o700)
        (out / "data").mkdir(exist_ok=True)
        if plan.tls:
            hostnames = [plan.client_host, *plan.hostnames, "localhost", "127.0.0.1"]
            if plan.bind and plan.bind not in ("0.0.0.0", "::"):
                hostnames.append(plan.bind)
            make_bench_tls(out / "tls", hostnames, plan.days, keep_ca=not new_ca)
        entries = []
        for a in plan.accounts:
            password = secrets.token_urlsafe(24)  # 192 random bits, no ':' or newline
            _write(files[f"secret:{a.username}"], password + "\n", 0o600)
            entries.append(f"{a.username}:{hash_password(password)}")
            _write(files[f"client:{a.username}"], client_toml_text(plan, a), 0o644)
        # the hashes are not the passwords, but an offline guess needs only them: keep private
        _write(files["passwd"], "\n".join(entries) + "\n", 0o600)
        _write(files["acl"], acl_text(plan), 0o644)
        _write(files["conf"], mosquitto_conf_text(plan), 0o644)
        if broker_account is not None:
            _hand_over(plan, *broker_account)
        removed = {}
        for user in stale:  # no longer in passwd: its secret and config would only mislead
            for path in (out / "secrets" / f"{user}.password", out / f"{user}.toml"):
                if path.is_file():
                    path.unlink()
                    removed[f"removed:{user}:{path.suffix}"] = path
    except OSError as exc:
        raise ConfigError(f"{exc.filename or plan.out}: cannot write: {exc.strerror}") from exc
    return {**files, **removed}


def _users(passwd: Path) -> list[str]:
    """The user names of a Mosquitto password file (none if there is no such file)."""
    try:
        lines = passwd.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [ln.split(":", 1)[0] for ln in lines if ":" in ln and _NAME.fullmatch(ln.split(":")[0])]


def default_user() -> str:
    """The account Mosquitto should run as: the caller, or for root the packaged
    ``mosquitto`` account (Mosquitto started as root drops to it anyway)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return "root"
    return "mosquitto"


def _broker_account(plan: BrokerPlan) -> tuple[int, int] | None:
    """(uid, gid) to hand Mosquitto's files to: only when root writes them for another account."""
    if os.geteuid() != 0 or not plan.user or plan.user == "root":
        return None
    try:
        entry = pwd.getpwnam(plan.user)
    except KeyError as exc:
        raise ConfigError(f"--user {plan.user}: no such account on this machine") from exc
    return entry.pw_uid, entry.pw_gid


def _hand_over(plan: BrokerPlan, uid: int, gid: int) -> None:
    """Give Mosquitto's account the files Mosquitto itself reads or writes; the client secrets
    and the CA key stay with the caller."""
    d = plan.out
    log = d / "mosquitto.log"
    log.touch(exist_ok=True)
    owned = [d / "passwd", d / "acl", d / "data", log]
    if plan.tls:
        owned.append(d / "tls" / "server.key")
    for path in owned:
        os.chown(path, uid, gid)


# -- the command -----------------------------------------------------------------------------
EPILOG = """\
examples:
  gateway broker-config --out bench-broker --vin KMHK381GFKU000001
  gateway broker-config --out /etc/gateway/broker --vin VIN1 --vin VIN2 \\
      --owner alice=VIN1 --owner bob=VIN2 --tls --hostname bench.local

then:
  mosquitto -c DIR/mosquitto.conf
  gateway replay LOG --dbc ... --config DIR/gateway-VIN.toml      (the vehicle)
  gateway owner --config DIR/owner-VIN.toml                        (its owner)

Passwords are random, written to DIR/secrets/USER.password (mode 0600) and never printed.
Each owner may read only PREFIX/<their VIN>/owner/# and write only its consent/set and
command topics; each gateway may write only its own PREFIX/<VIN>/owner/# and read those two.
Run again with --force to rotate every password (the CA is kept). See docs/broker.md.
"""


def _owner(spec: str) -> tuple[str, str]:
    name, sep, vin = spec.partition("=")
    if not sep or not name or not vin:
        raise argparse.ArgumentTypeError(f"{spec!r}: give NAME=VIN")
    return name, vin


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "broker-config",
        help="generate a locked-down Mosquitto config (users, ACL, TLS) for the bench",
        description="Generate a Mosquitto 2.x configuration in which every owner channel "
        "PREFIX/VIN/owner/# is readable only by that vehicle's owners and writable only by "
        "that vehicle's gateway: a password file with random passwords, an ACL, an optional "
        "TLS listener with a bench CA, and a client config per user for --config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    p.add_argument(
        "--vin", action="append", required=True, help="a vehicle (its gateway user); repeatable"
    )
    p.add_argument(
        "--owner",
        action="append",
        type=_owner,
        default=[],
        metavar="NAME=VIN",
        help="an owner user of VIN; repeatable (default: one user owner-VIN per --vin)",
    )
    p.add_argument(
        "--prefix",
        "--topic-prefix",
        dest="prefix",
        default="vehicles",
        help="topic prefix (default 'vehicles')",
    )
    p.add_argument("--port", type=int, default=1883, help="plain MQTT listener port (1883)")
    p.add_argument(
        "--bind", default="", metavar="ADDR", help="listen on this address only (default: all)"
    )
    p.add_argument("--tls", action="store_true", help="add a TLS listener and create a bench CA")
    p.add_argument("--tls-port", type=int, metavar="N", help="TLS port, with --tls (default 8883)")
    p.add_argument("--tls-only", action="store_true", help="no plain listener (with --tls)")
    p.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="H",
        help="name clients use for the broker; the first goes into the client configs, all "
        "into the server certificate (default: --bind if given, else localhost)",
    )
    p.add_argument(
        "--user",
        metavar="ACCOUNT",
        help="account Mosquitto runs as when started as root (default: you, or 'mosquitto' "
        "when run as root; then the broker's files are handed to it)",
    )
    p.add_argument("--days", type=int, default=365, help="certificate validity in days (365)")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing configuration: new passwords and server certificate, "
        "same CA (rotation)",
    )
    p.add_argument("--new-ca", action="store_true", help="with --force: a new bench CA too")
    p.set_defaults(func=_cmd_broker_config)


def _cmd_broker_config(args: argparse.Namespace) -> int:
    if args.tls_port is not None and not args.tls:
        raise ConfigError("--tls-port needs --tls (without it there is no TLS listener)")
    plan = BrokerPlan(
        out=Path(args.out).expanduser().resolve(),
        vins=tuple(args.vin),
        owners=tuple(args.owner),
        prefix=args.prefix,
        port=args.port,
        bind=args.bind,
        tls=args.tls,
        tls_port=8883 if args.tls_port is None else args.tls_port,
        tls_only=args.tls_only,
        hostnames=tuple(args.hostname),
        days=args.days,
        user=args.user if args.user is not None else default_user(),
    )
    if args.new_ca and not args.force:
        raise ConfigError("--new-ca replaces an existing configuration: give --force too")
    files = generate(plan, force=args.force, new_ca=args.new_ca)
    out = plan.out
    for vin in plan.unowned:
        print(
            f"gateway: warning: VIN {vin} has no owner: no user may read {plan.prefix}/{vin}/"
            f"owner/# (add --owner NAME={vin})",
            file=sys.stderr,
        )
    gone = sorted({k.split(":")[1] for k in files if k.startswith("removed:")})
    if gone:
        print(f"removed the password and config of users no longer configured: {', '.join(gone)}")
    print(f"wrote the Mosquitto configuration to {out}/ (mosquitto.conf, passwd, acl)")
    print(f"passwords: {out / 'secrets'}/USER.password (mode 0600; not shown here)")
    if plan.tls:
        print(f"bench CA for clients: {out / 'tls' / 'ca.crt'} (keep tls/ca.key private)")
    print(f"start the broker: mosquitto -c {files['conf']}")
    for a in plan.accounts:
        print(
            f"  {a.role.value} {a.username} ({plan.prefix}/{a.vin}/owner): --config {out / a.username}.toml"
        )
    return 0
