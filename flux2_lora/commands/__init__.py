"""The command layer: one module per command group, each command a typed function whose signature is its flags and
whose docstring is its help. `flux2_lora/cli.py` holds the table that names them; `args.py` builds the parsers.

These functions parse nothing and decide nothing the domain modules could: they call the domain's plain functions,
print what the user asked to see and return the exit code.
"""
