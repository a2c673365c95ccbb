"""``python -m engine.cli ...``: the ``rainsweep`` command where its console script is not on the PATH."""
from engine.cli import main

if __name__ == "__main__":
    main(prog_name="rainsweep")
