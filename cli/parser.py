"""The parser of ``train.py`` and ``evaluate.py``: one-line errors, no abbreviated options, a short ``--help``.

jsonargparse answers a typo with the whole usage (74 lines) and no suggestion, takes ``--trainer.max_epoch`` as
``--trainer.max_epochs`` (argparse's prefix matching), and lists Lightning's ~45 Trainer options before this
project's. Here an error is one line naming the fix, ``--help`` shows the run's model and data options first and
names the Trainer's (``--help-full`` prints jsonargparse's complete help).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import importlib
import inspect
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from jsonargparse import ArgumentParser, Namespace
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from activation_transfer.errors import UsageError, debug_enabled, one_line

# Options whose right spelling is elsewhere: option -> the fix (shown instead of a spelling suggestion).
HINTS = {
    "--ckpt_path": "evaluate.py does not take --ckpt_path: pass the translator checkpoint as --model.translator_ckpt",
}
# A subclass-mode option unknown to the class: jsonargparse's message names the key, the class and the option.
NOT_ACCEPTED = re.compile(r"Parser key \"(\w+)\".*class_path '([\w.]+)'.*Option '([\w.]+)' is not accepted", re.S)
# Not in the short help: the groups shown otherwise, and Lightning's checkpoint-loading detail.
SHORT_HELP_SKIP = {"model", "data", "trainer", "weights_only"}
# The parts of jsonargparse's type error of one option: the option, the value given, the types it accepts.
PARSER_KEY = re.compile(r'Parser key "([\w.]+)":')
GIVEN_VALUE = re.compile(r"(?:Given value|Got value): (.+)")
# (a list type, e.g. "collections.abc.Sequence[int]" beside "<class 'NoneType'>", reads "a list of int")
TYPE_OR_LITERAL = re.compile(
    r"<class '([\w.]+)'>|typing\.Literal\[(.*?)\]|(?:collections\.abc\.|typing\.)?(?:Sequence|List|list)\[([\w.]+)\]"
)
EXPECTED = re.compile(rf"Expected a (?:{TYPE_OR_LITERAL.pattern})")
# A Union's types as jsonargparse lists them ("Subtypes: [...]"): its per-type errors name a Literal[64, 32, 16] "int".
SUBTYPES = re.compile(r"Subtypes: \[(.*)\]")
# A key of a config file (-c) that the subcommand does not take.
CONFIG_KEY_NOT_ACCEPTED = re.compile(r"Subcommand '\w+' does not accept option '([\w.]+)'")
GROUP_CONFIG = re.compile(r"\n  --[\w.]+ CONFIG\s+Path to a configuration file\.")
# Trainer options named in the short help (the rest: --help-full).
COMMON_TRAINER = ("max_epochs", "accelerator", "devices", "precision", "default_root_dir", "logger", "callbacks")


# A class_path that does not import: jsonargparse's reason is on the line after, which the one-line summary lost.
CLASS_NOT_IMPORTED = re.compile(
    r"Problem with given class_path '([\w.]+)':\s*(No module named '[\w.]+'|module '([\w.]+)' has no attribute '\w+')"
)


def class_path_error(message: str) -> str | None:
    """``--KEY PATH: cannot import it (REASON); did you mean ...?`` for a class path that names no class (a typo in
    the class or module name), else None."""
    m = CLASS_NOT_IMPORTED.search(message)
    keys = PARSER_KEY.findall(message)
    if m is None or not keys:
        return None
    path, reason, module = m.groups()
    close = []
    if module is not None:  # the module imports (its attribute is missing): suggest its classes spelled alike
        try:
            classes = [name for name, value in vars(importlib.import_module(module)).items() if inspect.isclass(value)]
        except ImportError:  # the attribute was missing inside the module's own import: no suggestion
            classes = []
        close = [f"{module}.{n}" for n in difflib.get_close_matches(path.rpartition(".")[2], classes, n=2, cutoff=0.6)]
    maybe = f"; did you mean {' or '.join(close)}?" if close else "; give a class as module.ClassName"
    return f"--{keys[0]} {path}: cannot import it ({reason}){maybe}"


# jsonargparse's report of a value that fits no type of an Optional/Union: the real reason is a nested "- " line.
UNION_NOISE = re.compile(r"^(Does not validate against any of the|Expected a <class|Subtypes:|Errors:|Given value)")


def union_error(message: str) -> str | None:
    """The real reason inside jsonargparse's "Does not validate against any of the Union subtypes / Subtypes: [...]"
    report (e.g. a check of an option's dataclass), or None when ``message`` is not such a report."""
    if "Does not validate against any of the" not in message:
        return None
    reasons = [
        line.strip().removeprefix("- ").strip()
        for line in message.splitlines()
        if line.strip().startswith("- ") and not UNION_NOISE.match(line.strip().removeprefix("- ").strip())
    ]
    return "; ".join(dict.fromkeys(reasons)) or None


def option_type_error(message: str) -> str | None:
    """``--KEY: expected int or null; got abc`` for jsonargparse's page on a value of the wrong type, else None
    (a check's own message, e.g. of a dataclass, is :func:`union_error`'s)."""
    keys = PARSER_KEY.findall(message)
    # A subclass-mode group ("data") nests its class's own report: the option is the keys joined, the error the last.
    inner = message.rsplit("Problem with given class_path", 1)[-1]
    given = GIVEN_VALUE.search(inner)
    if not keys or given is None:
        return None
    listed = SUBTYPES.search(inner)
    found = TYPE_OR_LITERAL.findall(listed.group(1)) if listed else EXPECTED.findall(inner)
    kinds = [
        {"NoneType": "null"}.get(cls, cls) if cls else f"a list of {item}" for cls, _, item in found if cls or item
    ]
    if literals := [literal for cls, literal, item in found if not cls and not item]:  # several Literals: one list
        kinds.append(f"one of {', '.join(literals)}")
    if not kinds:
        return None
    return f"--{'.'.join(keys)}: expected {' or '.join(dict.fromkeys(kinds))}; got {given.group(1).strip()}"


class _ShortHelp(argparse._HelpAction):
    """``-h/--help``: the short help for the options parsed so far (a ``-c`` before it picks the classes shown)."""

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        parser.print_help_for(namespace, full=False)
        parser.exit()


class _FullHelp(argparse._HelpAction):
    """``--help-full``: jsonargparse's complete help."""

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        parser.print_help_for(namespace, full=True)
        parser.exit()


def first_sentence(text: str) -> str:
    """The first sentence of an option's help (Lightning's run for a page); jsonargparse adds type and default."""
    m = re.match(r"(.+?\.)(?=\s|[A-Z]|$)", " ".join(text.split()))
    return m.group(1) if m else text


def _class(value, default: type | None) -> type | None:
    """The class a parsed ``{class_path, ...}`` entry names, else ``default``."""
    path = value.get("class_path") if isinstance(value, Namespace | dict) else value
    if not isinstance(path, str) or "." not in path:
        return default
    module, _, name = path.rpartition(".")
    return getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name, default)


def _read_yaml(path: str) -> tuple[object, Exception | None]:
    """A config file's content and None, or None and the YAML error (an unreadable file: None, None)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f), None
    except yaml.YAMLError as err:
        return None, err
    except OSError:
        return None, None


class ProjectParser(LightningArgumentParser):
    """LightningArgumentParser with prefix matching off, one-line errors and a short ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        kwargs["add_help"] = False
        super().__init__(*args, **kwargs)
        self.add_argument("-h", "--help", action=_ShortHelp, help="Show this project's options and exit.")
        self.add_argument("--help-full", action=_FullHelp, help="Show every option (Lightning's included) and exit.")
        self.classes: dict[str, type] = {}  # "model"/"data" -> the class in non-subclass mode (set by the CLI)
        self.linked: set[str] = set()  # "model.<arg>" filled in by links: not the user's to give, not in the help

    # --- help ----------------------------------------------------------------------------------------------------

    def print_help_for(self, namespace, full: bool) -> None:
        text = self.format_help() if full or not self.groups else self.short_help(namespace or Namespace())
        sys.stdout.write(text)

    def _selected(self, namespace, key: str) -> type | None:
        """The class of ``model``/``data``: the CLI's own, or the subclass a config/option/default names."""
        if key in self.classes:
            return self.classes[key]
        value = namespace.get(key) if isinstance(namespace, Namespace) else None
        return _class(value, None) or _class(self.get_defaults().get(key), None)

    def short_help(self, namespace) -> str:
        prog = self.prog.replace(" [options]", "")
        lines = [f"usage: {prog} [-c CONFIG] [--print_config] [--OPTION VALUE ...]", ""]
        if self.description:
            lines += [self.description, ""]
        side = ArgumentParser(prog=prog, usage=argparse.SUPPRESS, add_help=False)
        for action in self._actions:  # the run's own options (config, print_config, seed, the subcommand's)
            if action.option_strings and action.dest.split(".")[0] not in SHORT_HELP_SKIP:
                short = copy.copy(action)
                short.help = first_sentence(action.help) if isinstance(action.help, str) else action.help
                side._add_action(short)
        for key in ("model", "data"):
            cls = self._selected(namespace, key)
            if cls is not None:
                skip = {name for k, name in (t.split(".", 1) for t in self.linked) if k == key}
                side.add_class_arguments(cls, key, fail_untyped=False, sub_configs=True, skip=skip)
        # Each group's "--model CONFIG: Path to a configuration file." (a YAML for just that group): rarely wanted.
        lines.append(GROUP_CONFIG.sub("", side.format_help()).strip("\n"))
        trainer = [f"--trainer.{name}" for name in COMMON_TRAINER]
        more = sum(a.dest.startswith("trainer.") and bool(a.option_strings) for a in self._actions) - len(trainer)
        footer = f"Lightning's Trainer options: {', '.join(trainer)} and {more} more."
        footer += f" Every option with its help: {prog} --help-full."
        if any(key not in self.classes for key in ("model", "data")):
            footer += " Another model or data module: --model CLASS / --data CLASS, its options: --model.help CLASS."
        lines += ["", *textwrap.wrap(footer, width=shutil.get_terminal_size().columns - 2), ""]
        return "\n".join(lines)

    # --- errors --------------------------------------------------------------------------------------------------

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises (inner parsers, debug mode)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {self.explain(message)}\n")
        self.exit(2)

    def explain(self, message: str) -> str:
        """One line for ``message`` where the fix is known (config before the subcommand, unknown option), else the
        message itself."""
        if "is not accepted before subcommand" in message:
            return self._config_after_subcommand()
        if m := re.match(r"unrecognized arguments: (\S+)", message):
            return self._closest(m.group(1), self._option_names())
        if "Problems parsing config" in message:
            return self._bad_yaml() or " ".join(message.split())
        if message.startswith("Unexpected config") or 'Parser key "config": Path is not a file' in message:
            return self._not_a_config() or " ".join(message.split())
        if m := CONFIG_KEY_NOT_ACCEPTED.search(message):
            found = self._closest(f"--{m.group(1)}", self._option_names()).replace("--", "")
            return f"{self._config_names(m.group(1))}: {found.replace('unknown option', 'unknown key')}"
        if m := NOT_ACCEPTED.search(message):
            key, cls, option = m.groups()
            params = inspect.signature(_class(cls, None)).parameters
            names = [f"--{key}.{p}" for p in params if p != "self"]
            return self._closest(f"--{key}.{option}", names)
        # jsonargparse's own message, without the page of usage before it (and without its union noise)
        return (
            class_path_error(message) or option_type_error(message) or union_error(message) or " ".join(message.split())
        )

    def _config_files(self) -> list[str]:
        args = list(getattr(self, "args", None) or [])
        files = [b for a, b in zip(args, args[1:]) if a in ("-c", "--config")]
        return files + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]

    def _config_names(self, key: str) -> str:
        """``config FILE``: the -c files that hold the dotted ``key`` (all of them when none does)."""

        def holds(path: str) -> bool:
            node = _read_yaml(path)[0]
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    return False
                node = node[part]
            return True

        files = [p for p in self._config_files() if holds(p)] or self._config_files()
        return f"config {' or '.join(files)}" if files else "a config"

    def _bad_yaml(self) -> str | None:
        """``config FILE: not valid YAML (...)`` for the first -c file that does not parse, else None."""
        for path in self._config_files():
            err = _read_yaml(path)[1]
            if err is not None:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                return f"config {path}: not valid YAML ({getattr(err, 'problem', None) or err}{where})"
        return None

    def _not_a_config(self) -> str | None:
        """``config FILE: ...`` for the first -c path that is a folder or a file without a mapping of options (empty,
        a comment, a list, a word), else None: jsonargparse's "Unexpected config: <its text>" named no file."""
        for path in self._config_files():
            if Path(path).is_dir():
                return f"config {path} is a folder; -c takes a YAML file"
            if not Path(path).is_file():  # an inline config (-c '{...}')
                continue
            content, err = _read_yaml(path)
            if err is None and not isinstance(content, dict):
                what = "is empty" if content is None else f"holds a {type(content).__name__}"
                return f"config {path} {what}, not a mapping of options (e.g. trainer:, model:, data:); fix or drop it"
        return None

    def _subcommand(self) -> tuple[str | None, ArgumentParser]:
        args = getattr(self, "args", None) or []
        choices = next((a.choices for a in self._actions if isinstance(a.choices, dict)), {})
        name = next((a for a in args if a in choices), None)
        return name, choices.get(name, self)

    def _option_names(self) -> list[str]:
        _, sub = self._subcommand()
        parsers = [self] if sub is self else [self, sub]
        return [o for p in parsers for a in p._actions for o in a.option_strings if o.startswith("--")]

    def _closest(self, option: str, names: list[str]) -> str:
        key = option.split("=", 1)[0]
        if key in HINTS:
            return HINTS[key]
        names = sorted({n.rstrip("+") for n in names})  # "--x+" (append to a list) is "--x" for spelling
        # Spelling is compared within the option's group (--model., --trainer.), where the shared prefix does
        # not make every name look close; an unknown group is compared as a whole.
        group, _, leaf = key.rpartition(".")
        same = {n.rpartition(".")[2]: n for n in names if group and n.rpartition(".")[0] == group}
        if same:
            close = [same[m] for m in difflib.get_close_matches(leaf, list(same), n=2, cutoff=0.6)]
        else:
            close = difflib.get_close_matches(key, names, n=2, cutoff=0.75)
        maybe = f"; did you mean {' or '.join(close)}?" if close else "; --help lists the options"
        return f"unknown option {key}{maybe}"

    def _config_after_subcommand(self) -> str:
        args = list(getattr(self, "args", None) or [])
        name, _ = self._subcommand()
        if name is None:
            return "put -c/--config after the subcommand"
        i = args.index(name)
        fixed = " ".join(["python", self.prog.split()[0], name, *args[:i], *args[i + 1 :]])
        return f"put -c after the subcommand: {fixed}"


@contextlib.contextmanager
def hidden_host_argv(args=()) -> Iterator[None]:
    """While a LightningCLI gets ``args`` inside another program (the demo, tests, an organism trained for a command),
    ``sys.argv`` is cut to the program name: LightningCLI warns when the host's ``sys.argv`` also holds arguments.
    ``args`` None (the CLI reads ``sys.argv`` itself) changes nothing; without ``args``, the host's are hidden."""
    if args is None:
        yield
        return
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


@contextlib.contextmanager
def usage_errors(prog: str) -> Iterator[None]:
    """Bad input (:class:`UsageError`, a folder that cannot be written, a Trainer setting Lightning refuses, such as a
    GPU accelerator on a machine without one) as one line ``<prog>: error: ...`` and exit status 2;
    ``ACTIVATION_TRANSFER_DEBUG=1`` shows the traceback. Any other exception is a bug: it propagates."""
    try:
        yield
    except (UsageError, PermissionError, ValueError, MisconfigurationException) as err:
        # jsonargparse re-raises a class's check at instantiation as a ValueError listing the Union's subtypes.
        message = union_error(str(err)) if type(err) is ValueError else None
        if debug_enabled() or (type(err) is ValueError and message is None):
            raise
        if isinstance(err, PermissionError):
            message = f"cannot write {err.filename or 'a file'} ({err.strerror}); pick a writable folder"
        message = message or one_line(err)
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:  # a next CLI in this process would log into it
            wandb.finish(exit_code=2)
        sys.stderr.write(f"{prog}: error: {message} (traceback: ACTIVATION_TRANSFER_DEBUG=1)\n")
        raise SystemExit(2) from None
    except Exception as err:
        # W&B without a login (no API key, no WANDB_MODE) raises its own UsageError/AuthenticationError.
        if debug_enabled() or type(err).__module__.split(".")[0] != "wandb":
            raise
        if type(err).__name__ not in ("UsageError", "AuthenticationError"):
            raise
        sys.stderr.write(
            f"{prog}: error: W&B: {one_line(err)} (or run without an account: WANDB_MODE=offline or disabled; "
            "traceback: ACTIVATION_TRANSFER_DEBUG=1)\n"
        )
        raise SystemExit(2) from None
