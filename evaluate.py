"""Evaluate a translator by injection on multi-hop QA: ``python evaluate.py test -c configs/eval/tiny.yaml
--model.translator_ckpt PATH``. A thin wrapper: the CLI lives in ``cli.lightning_cli`` (imported only when the command
needs it: ``cli.fast_start`` answers the top-level --help and a missing config file without Lightning)."""

from cli.fast_start import keep_freed_memory, run_command


def main(args=None):
    keep_freed_memory()  # before any tensor: decoding on CPU allocates and frees at every step
    from cli.lightning_cli import eval_main

    return eval_main(args)


if __name__ == "__main__":
    run_command("evaluate.py", main)
