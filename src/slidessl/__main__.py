"""``python -m slidessl`` (also what ``torchrun -m slidessl`` runs)."""

from slidessl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
