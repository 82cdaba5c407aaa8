"""Train one configuration (or a sweep with -m). Example:

    python run.py method=mlaan backbone=resnet110 k=55 -m
"""

from lla.cli import main

if __name__ == "__main__":
    main()
