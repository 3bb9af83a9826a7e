"""Train an offline model organism: ``python organism.py fit -c lightning_modules/organism_configs/receiver.yaml``."""

from lightning_modules.organism_cli import main

if __name__ == "__main__":
    main()
