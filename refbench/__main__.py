"""`python -m refbench` is the same as the `refbench` console script."""

from refbench.cli import main

if __name__ == "__main__":
    main()
