"""The command line's side of toolkit.options: each declared option as a click option, with its
flag, choices or bounds, default and help, and a bad value refused in the declaration's words."""
from __future__ import annotations

import click

from ..options import BY_NAME, RUN, Option


class OptionType(click.ParamType):
    """A declared option's values: its choices, or a number within its bounds ("auto" too where
    it stands in for "decide for me")."""

    def __init__(self, option: Option):
        self.option, self.name = option, option.name

    def values(self) -> tuple:
        return self.option.choices + (("auto",) if self.option.auto else ())

    def get_metavar(self, param, ctx=None):
        return "[" + "|".join(self.values()) + "]" if self.option.choices else None

    def convert(self, value, param, ctx):
        value = self.option.parse(value)
        problem = self.option.problem(value)
        if problem:
            self.fail(problem, param, ctx)
        return value

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(value) for value in self.values() if value.startswith(incomplete)]


def click_option(option: Option, **changes):
    """The click option of a declaration. A run option's flag defaults to None (not given: the
    preset's value stands); `changes` are a command's own (an answer's default length)."""
    kwargs = {"help": option.help, "metavar": option.metavar}
    if option.type is bool and "/" not in option.cli_flag:
        kwargs["is_flag"] = True
    elif option.choices or option.type in (int, float) or option.values is not None:
        kwargs["type"] = OptionType(option)
    if option.part != RUN and option.default not in (None, False):
        kwargs.update(default=option.default, show_default=True)
    kwargs.update(changes)
    return click.option(option.cli_flag, *option.aliases, option.name, **kwargs)


def declared(*names: str, **defaults):
    """Decorate a command with the declared options `names`, in that order; `defaults` sets a
    command's own default for some of them (shown in --help)."""
    def decorate(command):
        for name in reversed(names):
            own = {"default": defaults[name], "show_default": True} if name in defaults else {}
            command = click_option(BY_NAME[name], **own)(command)
        return command

    return decorate
