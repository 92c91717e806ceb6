"""`edge-sdk keys generate|id|root|rotate`: signing keys and the trust root devices pin."""

from __future__ import annotations

from pathlib import Path

import typer

from ..signing import generate_keypair
from .app import app, console

keys_app = typer.Typer(help="Ed25519 keys for signing releases, and the trust root (root.json) devices pin.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")

_DAYS = typer.Option(365, "--expires-days", min=1, help="The root expires after this many days (rotate before).")


@keys_app.command("generate")
def generate(
    private_key: Path = typer.Argument(..., help="Where to write the private key (PEM, mode 0600)."),
    public_key: Path = typer.Option(None, "--public", help="Public key path (default: PRIVATE_KEY with .pub)."),
) -> None:
    """Generate a signing key pair."""
    from ..signing import load_public_key
    from ..trust import key_id

    priv, pub = generate_keypair(private_key, public_key)
    console.print(f"private key: {priv}\npublic key:  {pub}\nkey id:      {key_id(load_public_key(pub))}")


@keys_app.command("id")
def show_id(public_key: Path = typer.Argument(..., help="A PEM public or private key.")) -> None:
    """Print the key id (TUF: sha256 of the key's canonical JSON) release statements name it by."""
    from ..signing import load_private_key, load_public_key
    from ..trust import key_id

    data = public_key.read_bytes() if public_key.exists() else b""
    key = load_private_key(public_key) if b"PRIVATE" in data else load_public_key(public_key)
    typer.echo(key_id(key))


def _public(paths: list[Path]) -> list:
    from ..signing import load_public_key

    return [load_public_key(p) for p in paths]


def _private(paths: list[Path]) -> list:
    from ..signing import load_private_key

    return [load_private_key(p) for p in paths]


@keys_app.command("root")
def root(
    output: Path = typer.Argument(..., help="Where to write root.json (give it to devices as sync.public_key)."),
    root_key: list[Path] = typer.Option(..., "--root-key", help="Private key that may sign the next root (repeat)."),
    release_key: list[Path] = typer.Option(..., "--release-key", help="Public key that signs releases (repeat)."),
    root_threshold: int = typer.Option(1, "--root-threshold", help="Root keys needed to sign the next root."),
    release_threshold: int = typer.Option(1, "--release-threshold", help="Release keys needed per release."),
    expires_days: int = _DAYS,
) -> None:
    """Create trust root v1: root keys (keep them offline) and the keys that sign releases."""
    from datetime import timedelta

    from ..runtime.sync.releases import write_atomic
    from ..trust import TrustRoot, new_root

    data = new_root(_private(root_key), _public(release_key), root_threshold=root_threshold,
                    release_threshold=release_threshold, expires=timedelta(days=expires_days))
    write_atomic(output, data)
    trust = TrustRoot.from_bytes(data, str(output))
    console.print(f"root v{trust.version}: {output}; release keys {trust.keyids()}", highlight=False)


@keys_app.command("rotate")
def rotate(
    current: Path = typer.Argument(..., help="The root devices trust now (root.json of version N)."),
    output: Path = typer.Argument(..., help="Where to write root v N+1."),
    sign_key: list[Path] = typer.Option(..., "--sign-key", help="Private root key signing the new root: a threshold "
                                                                 "of the current root keys and of the new ones (repeat)."),
    add_release_key: list[Path] = typer.Option([], "--add-release-key", help="Public key that may sign releases."),
    add_root_key: list[Path] = typer.Option([], "--add-root-key", help="Public key that may sign later roots."),
    revoke: list[str] = typer.Option([], "--revoke", help="Key id to remove from every role (edge-sdk keys id)."),
    expires_days: int = _DAYS,
) -> None:
    """Write root v N+1 (new keys in, revoked keys out); devices accept it because v N's root keys signed it."""
    from datetime import timedelta

    from ..runtime.sync.releases import write_atomic
    from ..trust import TrustRoot, rotate_root

    old = TrustRoot.load(current)
    data = rotate_root(old.to_bytes(), _private(sign_key), add_release=_public(add_release_key),
                       add_root=_public(add_root_key), revoke=revoke, expires=timedelta(days=expires_days))
    new = old.rotate(data, str(output))  # refuse to write a root devices would refuse
    write_atomic(output, data)
    console.print(f"root v{new.version}: {output}; release keys {new.keyids()}", highlight=False)


@keys_app.command("publish-root")
def publish_root(
    root: Path = typer.Argument(..., help="Trust root to deliver (root.json of version N, from `keys rotate`)."),
    broker: str = typer.Option(..., "--broker", help="mqtt://[user:pass@]host[:port] or mqtts://…"),
    fleet: str = typer.Option(..., "--fleet", help="Fleet name (topic prefix edge/<fleet>)."),
    prefix: str = typer.Option("", "--prefix", help="Topic prefix instead of edge/<fleet>."),
    ca: Path = typer.Option(None, "--ca", help="CA certificate for mqtts:// brokers."),
    cert: Path = typer.Option(None, "--cert", help="Client certificate (PEM); needs --ca."),
    key: Path = typer.Option(None, "--key", help="Private key (PEM) of --cert, if not in the same file."),
) -> None:
    """Deliver a rotated root to the fleet (retained at <prefix>/trust/root/<N>); devices take it
    because the root keys of the version they trust signed it."""
    from ..cloud.publish import publish_root as publish
    from ..errors import ConfigError
    from .cloud import _tls

    try:
        data = root.read_bytes()
    except OSError as exc:
        raise ConfigError(f"trust root {root}: {exc.strerror or exc}") from None
    console.print(f"root published at {publish(data, broker, fleet, prefix=prefix, tls=_tls(ca, cert, key))}",
                  highlight=False)
