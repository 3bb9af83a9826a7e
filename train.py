"""Train a translator: ``python train.py fit -c configs/train/tiny.yaml`` (the CLI is cli/lightning_cli.py)."""

from cli.lightning_cli import train_main as main

if __name__ == "__main__":
    main()
