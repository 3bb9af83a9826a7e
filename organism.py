"""Train an offline model organism: ``python organism.py fit -c configs/organisms/receiver.yaml``."""

from cli.fast_start import run_command


def main(args=None):
    from cli.organism_cli import main as organism_main

    return organism_main(args)


if __name__ == "__main__":
    run_command("organism.py", main)
