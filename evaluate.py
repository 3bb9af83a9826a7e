"""Evaluate a translator by injection on multi-hop QA: ``python evaluate.py test -c configs/eval/tiny.yaml
--model.translator_ckpt PATH``. A thin wrapper: the code lives in ``lightning_modules.eval_cli``."""

from lightning_modules.eval_cli import main

if __name__ == "__main__":
    main()
