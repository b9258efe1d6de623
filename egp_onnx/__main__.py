"""`python -m egp_onnx` runs the command line."""

from egp_onnx.cli.main import main

main(prog_name="egp-onnx")
