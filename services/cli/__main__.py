"""Run the CLI as ``python -m services.cli`` (same as the ``maas`` console script)."""

from services.cli.main import main

if __name__ == "__main__":
    main()
