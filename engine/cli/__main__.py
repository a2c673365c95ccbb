"""``python -m engine.cli ...``: the ``rainsweep`` command where its console script is not on the PATH."""
from engine.cli import main

main(prog_name="rainsweep")
