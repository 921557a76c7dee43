"""python -m condaproxy: the same as the condaproxy command."""

from condaproxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
