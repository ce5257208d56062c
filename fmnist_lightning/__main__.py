"""`python -m fmnist_lightning` runs the `fmnist` command line."""

from fmnist_lightning.cli import main

if __name__ == "__main__":
    main()
