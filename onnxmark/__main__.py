"""`python -m onnxmark` runs the same command line as the `onnxmark` script."""
from cli.main import main

main(prog_name="onnxmark")
