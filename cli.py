"""evolq-pl command line: ``python cli.py fit|validate|test|... --config <name or path>`` (same as ``evolq ...``)."""

from evolq_pl.cli import cli_main

if __name__ == "__main__":
    cli_main()
