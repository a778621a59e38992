"""Command lines of the key lifecycle (``dccsign keys ...``), for tests and benchmarks that
drive the CLI in a child process or through ``dccsign.cli.main.main``."""

from __future__ import annotations

import os

__all__ = ["csr_argv", "token_generate_argv"]

StrPath = str | os.PathLike[str]


def token_generate_argv(
    keystore: StrPath, *, module: str, label: str, pin_file: StrPath, alg: str = "ES256"
) -> list[str]:
    """``keys generate`` of an *alg* key inside the PKCS#11 token *label* of *module*."""
    return [
        "keys", "generate", "--keystore", str(keystore), "--alg", alg,
        "--pkcs11-module", module, "--token-label", label, "--pin-file", str(pin_file),
    ]  # fmt: skip


def csr_argv(keystore: StrPath, key: str, *, subject: str, usage: str) -> list[str]:
    """``keys csr`` for the pending key named *key*: its DN *subject* and DCC *usage*
    (comma-separated: vaccination, test, recovery)."""
    return [
        "keys", "csr", "--keystore", str(keystore), "--key", key,
        "--subject", subject, "--usage", usage,
    ]  # fmt: skip
