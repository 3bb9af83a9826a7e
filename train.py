"""Train a translator: ``python train.py fit -c configs/train/tiny.yaml`` (see lightning_modules/train_cli.py)."""

from lightning_modules.train_cli import main

if __name__ == "__main__":
    main()
