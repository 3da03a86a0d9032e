"""What every subcommand shares: its parser set-up, config files, the results table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import tomllib

from sarloc.core.errors import ConfigError, brief


class _Help(argparse.HelpFormatter):
    """Shows an option's default when it has a meaningful one (not None, False, or already in its help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        d = action.default
        if "default" in h or d in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return f"{h} (default: {' '.join(map(str, d)) if isinstance(d, list | tuple) else d})"


def add_command(sub, name: str, common: argparse.ArgumentParser, help: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand parser that accepts ``-v`` / ``-q`` after its name and shows every option's default."""
    return sub.add_parser(
        name,
        help=help,
        description=kw.pop("description", help[:1].upper() + help[1:] + "."),
        parents=[common],
        formatter_class=_Help,
        **kw,
    )


def read_config(path: str | Path) -> dict:
    """The settings of a ``--config`` file: TOML (``.toml``) or JSON (``.json``), a table whose keys are checked
    when the config is built.

    Raises:
        ConfigError: missing, unreadable, malformed, or not a table of settings (one line naming the file).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {p} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {p}: cannot read it ({brief(e)})") from None
    kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
    try:
        obj = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"--config {p}: not valid {kind} ({brief(e)}); fix the file") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"--config {p}: expected a table of settings, got {type(obj).__name__}")
    return obj


def _cell(v: object) -> str:
    """A table cell: floats to 3 decimals, integers as they are, anything missing or empty as "-"."""
    if isinstance(v, bool) or v is None or v == [] or v == {}:
        return f"{'-':>14s}"
    if isinstance(v, float):
        return f"{v:14.3f}"
    if isinstance(v, int):
        return f"{v:14d}"
    return f"{str(v)[:14]:>14s}"


def print_table(res: dict) -> None:
    cols = (
        "recall@1",
        "recall@5",
        "recall@10",
        "median_error_m",
        "p90_error_m",
        "within_100m",
        "queries",
        "ms_per_query",
    )
    if res.get("refiner_training"):
        print(f"graph refiner: {res['refiner']} ({res['refiner_training']})")
    print(f"{'scene / queries':42s} " + " ".join(f"{c:>14s}" for c in cols))
    for k, m in res.items():
        if isinstance(m, dict) and "recall@1" in m:
            label = f"{res.get('scene', '')} {k} [{m.get('method', '')}]"
            print(f"{label:42s} " + " ".join(_cell(m.get(c)) for c in cols))
    rel = [(k, m) for k, m in res.items() if isinstance(m, dict) and m.get("reliability")]
    for k, m in rel:
        bins = "  ".join(
            f"{b['bin']}: {b['predicted']:.2f}->{b['observed']:.2f} (n={b['n']})" for b in m["reliability"]
        )
        print(
            f"confidence {k}: abstain {m['abstain_rate']:.2f}, false fixes {m['false_fix_rate']:.3f}, "
            f"ECE {m['ece']:.3f} | {bins}"
        )
