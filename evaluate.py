"""Evaluate a translator by injection on multi-hop QA: ``python evaluate.py test -c configs/eval/tiny.yaml
--model.translator_ckpt PATH``. A thin wrapper: the CLI lives in ``cli.lightning_cli``."""

from cli.lightning_cli import eval_main as main

if __name__ == "__main__":
    main()
