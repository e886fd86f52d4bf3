"""`python -m naqs_cli` is the `naqs` command."""

from naqs_cli.cli import main

if __name__ == "__main__":
    main()
