"""Train an offline model organism: ``python organism.py fit -c configs/organisms/receiver.yaml``."""

from cli.organism_cli import main

if __name__ == "__main__":
    main()
