"""`python -m research` runs the CLI; with no arguments it runs the demo."""

from research import cli

if __name__ == "__main__":
    raise SystemExit(cli.main())
