"""``python -m pipeline <command> ...``: the same as the ``noisy-student`` console script."""

from pipeline.commands import main

if __name__ == "__main__":
    main()
