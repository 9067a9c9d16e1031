"""``python -m pyadvk`` and the ``pyadvk`` command."""

from pyadvk.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
