"""A benchmark's options from its command line, one way for every benchmark: the `--quick`
preset when asked, then each flag given, by the options dataclass's field names (a path made
absolute); a value the options refuse (their ValueError) is a usage error, not a traceback."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def from_args(cls: type[T], args: argparse.Namespace, quick: Mapping[str, object],
              parser: argparse.ArgumentParser) -> T:
    chosen: dict[str, Any] = dict(quick) if args.quick else {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f.name, None)
        if value is not None:
            chosen[f.name] = value.resolve() if isinstance(value, Path) else value
    try:
        return cls(**chosen)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
