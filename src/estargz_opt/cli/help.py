"""`--help` in sections: each option names its section, and a command lists its options
section by section, each with its default.

click has no option groups; the click-option-group library adds them, with mutual
exclusion rules this tool does not need, so a 40-line Option/Command pair does it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

FC = TypeVar("FC", bound=Callable[..., Any])
#: the sections, in the order --help shows them
IMAGE = "Image"
FORMAT = "Layer format"
PROFILE = "Profile"
WORKLOAD = "Workload"
REGISTRY = "Registry"
CACHE = "Cache"
OUTPUT = "Output"
SECTIONS = (IMAGE, FORMAT, PROFILE, WORKLOAD, REGISTRY, CACHE, OUTPUT)
#: where options with no section (--help) go
OTHER = "Other"


class SectionOption(click.Option):
    """An option that belongs to one --help section and shows its default, if it has
    one worth showing (not "", None, False or nothing)."""

    def __init__(self, *args: Any, section: str, **kwargs: Any) -> None:
        if section not in SECTIONS:
            raise ValueError(f"unknown --help section {section!r}")
        default = kwargs.get("default")
        if "show_default" not in kwargs:
            kwargs["show_default"] = default not in (None, "", False, ())
        super().__init__(*args, **kwargs)
        self.section = section


def option(section: str, *decls: str, **kwargs: Any) -> Callable[[FC], FC]:
    """click.option, in a --help section."""
    return click.option(*decls, cls=SectionOption, section=section, **kwargs)


def section_of(param: click.Parameter) -> str:
    return param.section if isinstance(param, SectionOption) else OTHER


class SectionedCommand(click.Command):
    """A command whose --help lists its options under their sections."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option):
                continue  # arguments are in the usage line and the text
            record = param.get_help_record(ctx)
            if record is not None:
                rows.setdefault(section_of(param), []).append(record)
        for name in (*SECTIONS, OTHER):
            if name in rows:
                with formatter.section(f"{name} options"):
                    formatter.write_dl(rows[name])
