"""Train a translator: ``python train.py fit -c configs/train/tiny.yaml`` (the CLI is lightning_modules/cli.py)."""

from lightning_modules.cli import train_main as main

if __name__ == "__main__":
    main()
