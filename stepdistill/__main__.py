"""``python -m stepdistill ...`` (also ``accelerate launch -m stepdistill ...``): the ``stepdistill`` command."""

from .commands import main

if __name__ == "__main__":
    raise SystemExit(main())
