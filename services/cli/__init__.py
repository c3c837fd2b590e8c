"""The `maas` command line: run the suite, manage models, call them."""
