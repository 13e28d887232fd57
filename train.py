"""Train the fashion DCGAN: `python train.py [experiment=fashion_photos] [key=value ...]`.

A thin Hydra entry point. `fashion_gan.train.run` does the work, and the tests call it too. Exit
codes are listed in fashion_gan/errors.py (ExitCode) and in the README.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fashion_gan.entry import check_overrides, configure_logging, exit_for_error

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
ORIGINAL_CWD = Path.cwd()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from fashion_gan.train import run

    overrides = list(HydraConfig.get().overrides.task)
    try:
        result = run(cfg, overrides=overrides, original_cwd=ORIGINAL_CWD)
    except Exception as error:  # noqa: BLE001 - exit_for_error re-raises anything that is not a user error
        exit_for_error(error, logging.getLogger("train"))
    if result.exit_code != 0:
        sys.exit(result.exit_code)


if __name__ == "__main__":
    configure_logging()
    try:
        check_overrides(sys.argv[1:], Path(CONFIG_DIR))
    except Exception as error:  # noqa: BLE001
        exit_for_error(error, logging.getLogger("train"))
    main()
