"""What ``train.py``, ``evaluate.py`` and ``organism.py`` answer before importing Lightning (about 5 s of imports
on a quiet CPU).

The top-level ``--help`` (without a subcommand) and a ``-c`` file that does not exist need none of it. Everything
else goes to the LightningCLI (``cli/lightning_cli.py``), whose parser knows the classes. Imports only the standard
library.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

USAGES = {
    "evaluate.py": (
        "Evaluate translators: python evaluate.py test -c CONFIG --model.translator_ckpt CKPT (test --help).",
        {"test": "Evaluate the translators by injection."},
    ),
    "organism.py": (
        "Train an offline model organism: python organism.py fit -c configs/organisms/receiver.yaml [--export_dir D].",
        {
            "fit": "Runs the full optimization routine.",
            "validate": "Perform one evaluation epoch over the validation set.",
            "test": "Perform one evaluation epoch over the test set.",
            "predict": "Run inference on your data.",
        },
    ),
    "train.py": (
        "Train a translator: python train.py fit -c CONFIG [--OPTION VALUE ...] (python train.py fit --help).",
        {
            "fit": "Runs the full optimization routine.",
            "validate": "Perform one evaluation epoch over the validation set.",
            "test": "Perform one evaluation epoch over the test set.",
            "predict": "Run inference on your data.",
        },
    ),
}


def top_help(prog: str) -> str:
    """The top-level help of ``prog``: its usage line, description and subcommands (each has its own --help)."""
    description, subcommands = USAGES[prog]
    lines = [f"usage: {prog} [-h] [--help-full] [-c CONFIG] [--print_config] {{{','.join(subcommands)}}} ...", ""]
    lines += [
        description,
        "",
        "subcommands (each with its own --help, e.g. " + f"{prog} {next(iter(subcommands))} --help):",
    ]
    lines += [f"  {name:<10} {text}" for name, text in subcommands.items()]
    lines += ["", "options: -c/--config CONFIG, --print_config, --help-full (every option, Lightning's included)"]
    return "\n".join(lines) + "\n"


def missing_config(argv: list[str]) -> str | None:
    """The first ``-c``/``--config`` file of ``argv`` that does not exist, or None."""
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if not path.lstrip().startswith(("{", "[")) and not Path(path).exists():  # not an inline JSON/YAML config
            return path
    return None


def answer_early(prog: str, argv: list[str] | None = None) -> int | None:
    """Answer ``prog``'s command line without Lightning when it can: the exit status (0: top-level help printed,
    2: a config file is missing, one line on stderr), or None (the LightningCLI answers)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        sys.stdout.write(top_help(prog))
        return 0
    if (path := missing_config(argv)) is not None:
        sys.stderr.write(f"{prog}: error: config file {path} does not exist (-c takes a YAML file)\n")
        return 2
    return None


def run_command(prog: str, main: Callable[[], object]) -> None:
    """The ``__main__`` of ``prog`` (train.py, evaluate.py): answer early when the command line allows it (exit 0 or
    2), else run ``main`` and leave out the garbage collection of the interpreter's shutdown.

    Python's shutdown collects garbage over every object still alive, among them those of the ~4,000 modules that
    Lightning, torch and transformers import: 1-2 s of a 13 s evaluation on a 2-core CPU, after its work is done.
    Frozen objects (``gc.freeze``) are left out. Nothing is lost: records, checkpoints and reports are written and
    closed by then, W&B is finished and logging is flushed by ``atexit``, which still runs. Only here, where the
    process is about to end: what is frozen is never collected (tests call ``main`` directly).
    """
    if (status := answer_early(prog)) is not None:
        sys.exit(status)
    keep_matplotlib_in_cache()
    try:
        main()
    except SystemExit as stop:
        # Lightning answers SIGTERM (kill, a scheduler's pre-emption, docker stop) with SIGTERMException, a SystemExit
        # without a code: the shell would read a finished job, and `train.py && evaluate.py` would go on.
        if type(stop).__name__ != "SIGTERMException":
            raise
        sys.stderr.write(f"{prog}: interrupted by SIGTERM; {RESUME.get(prog, 'rerun the same command')}\n")
        sys.exit(SIGTERM_STATUS)
    gc.freeze()


def keep_matplotlib_in_cache() -> None:
    """Point matplotlib's config and font cache (``MPLCONFIGDIR``; torchmetrics imports matplotlib, which creates
    ``~/.config/matplotlib`` and ``~/.cache/matplotlib`` on import) at ``<project cache>/matplotlib``, unless the user
    set it: nothing is written outside the run and cache folders the user chose."""
    from activation_transfer.io import cache_root  # the standard library only

    os.environ.setdefault("MPLCONFIGDIR", str(cache_root() / "matplotlib"))


# The shell's status of a process ended by SIGTERM (128 + 15), and how each command picks up what it had done.
SIGTERM_STATUS = 143
RESUME = {
    "train.py": "rerun the same command with --ckpt_path last to resume from the last checkpoint",
    "evaluate.py": "rerun the same command: the run folder keeps every finished shard",
    "organism.py": "rerun the same command (an organism trains from the start)",
}


# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next allocation (blocks up to 32 MiB from the heap, whose top is
    never given back) instead of returning it to the system; False where the C library has no ``mallopt``.

    By default glibc maps blocks over its (adaptive) threshold on their own and unmaps them when freed, and trims the
    heap's top, so the next tensor of that size faults its pages in again, zeroed by the kernel. An evaluation on CPU
    allocates and frees its activations and KV caches at every decoding step: on the organisms' matrix that was
    575k page faults, ~0.7 s of system time in a 13 s command (195k with this). The cost: the process keeps its peak
    memory until it exits.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
