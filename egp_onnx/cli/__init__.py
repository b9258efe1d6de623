"""The command line (main.py); its option groups, command bodies, output files and error mapping."""
