"""Train a translator: ``python train.py fit -c configs/train/tiny.yaml`` (the CLI is cli/lightning_cli.py, imported
only when the command needs it: ``cli.fast_start`` answers the top-level --help and a missing config file)."""

from cli.fast_start import run_command


def main(args=None, run: bool = True):
    from cli.lightning_cli import train_main

    return train_main(args, run)


if __name__ == "__main__":
    run_command("train.py", main)
